"""Every family trains on a device mesh with the single-device losses (tests/multidevice.py, 2 forced CPU devices,
fsdp=2, NF4 + LoRA, 2 steps of 8 records with 0, 1 or 2 images of varied sizes), and generates the single-device
greedy tokens there. Families whose packed vision arrays pad to one shape (`PER_SHARD_INPUTS`: Qwen2.5-VL's windows,
Qwen3-VL, Gemma 3) get a batch per data x fsdp coordinate, each device holding only its own shard's patches; the
others (LLaVA, Llama 3.2 Vision) a global batch."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, multidevice_env

PER_SHARD = {"qwen2_5_vl": True, "qwen3_vl": True, "gemma3": True, "llava": False, "mllama": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{family: [one-device run, fsdp=2 run]}, every family trained in one subprocess (one process start, one import
    of jax and jaxvlm)."""
    from jaxvlm.tiny import save_random_model
    model_dirs = {}
    for model_type in PER_SHARD:
        model_dirs[model_type] = tmp_path_factory.mktemp(model_type)
        save_random_model(str(model_dirs[model_type]), model_type)
    out = tmp_path_factory.mktemp("out")
    result = subprocess.run([sys.executable, "-m", "tests.multidevice", *map(str, model_dirs.values()), "--mesh",
                             "one", "fsdp=2", "--steps", "2", "--generate", "--out", str(out)], cwd=REPO,
                            env=multidevice_env(2), capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {model_type: [r for r in lines if r["model_dir"] == str(path)] for model_type, path in model_dirs.items()}


def trained(runs, model_type):
    return [r for r in runs[model_type] if "generated" not in r]


@pytest.mark.parametrize("model_type", list(PER_SHARD))
def test_every_family_trains_on_a_mesh_with_the_one_device_losses(runs, model_type):
    one, mesh = trained(runs, model_type)
    assert len(one["losses"]) == 2 and np.isfinite(one["losses"]).all()
    np.testing.assert_allclose(mesh["losses"], one["losses"], rtol=1e-5)
    if not PER_SHARD[model_type]:
        assert mesh["shard_layout"] is None
        return
    for key, (shape, block) in mesh["shard_layout"].items():
        assert shape[0] == 2 and block == [1, *shape[1:]], (key, shape, block)


@pytest.mark.parametrize("model_type", list(PER_SHARD))
def test_every_family_generates_the_one_device_tokens_on_a_mesh(runs, model_type):
    """Greedy generation (NF4, two left-padded prompts with an image each) on fsdp=2: each family's cache and decode
    step on sharded arrays (no Pallas kernel under a mesh) give the single device's tokens."""
    one, mesh = [r["generated"] for r in runs[model_type] if "generated" in r]
    assert one["left_padded"] and len(one["tokens"]) == 2
    assert mesh["tokens"] == one["tokens"]
