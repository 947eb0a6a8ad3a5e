"""Every family trains on a device mesh with the single-device losses (tests/multidevice.py, 2 forced CPU devices,
fsdp=2, NF4 + LoRA, 2 steps of 8 records with 0, 1 or 2 images of varied sizes). Families whose packed vision
arrays pad to one shape (`PER_SHARD_INPUTS`: Qwen2.5-VL's windows, Qwen3-VL, Gemma 3) get a batch per data x fsdp
coordinate, each device holding only its own shard's patches; the others (LLaVA, Llama 3.2 Vision) a global batch."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, multidevice_env

PER_SHARD = {"qwen2_5_vl": True, "qwen3_vl": True, "gemma3": True, "llava": False, "mllama": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from jaxvlm.tiny import save_random_model
    env, out = multidevice_env(2), {}
    for model_type in PER_SHARD:
        model_dir = tmp_path_factory.mktemp(model_type)
        save_random_model(str(model_dir), model_type)
        result = subprocess.run([sys.executable, "-m", "tests.multidevice", str(model_dir), "--mesh", "one",
                                 "fsdp=2", "--steps", "2", "--out", str(model_dir / "out")], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, (model_type, result.stderr[-3000:])
        out[model_type] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return out


@pytest.mark.parametrize("model_type", list(PER_SHARD))
def test_every_family_trains_on_a_mesh_with_the_one_device_losses(runs, model_type):
    one, mesh = runs[model_type]
    assert len(one["losses"]) == 2 and np.isfinite(one["losses"]).all()
    np.testing.assert_allclose(mesh["losses"], one["losses"], rtol=1e-5)
    if not PER_SHARD[model_type]:
        assert mesh["shard_layout"] is None
        return
    for key, (shape, block) in mesh["shard_layout"].items():
        assert shape[0] == 2 and block == [1, *shape[1:]], (key, shape, block)
