"""Generation on device meshes (`generate(..., mesh=...)`, `jaxvlm-generate --mesh`). The cache rule is checked here on
abstract meshes. Generation on meshes runs in one subprocess with 8 forced CPU devices (tests/multidevice_generate.py),
since this process has one, while this process computes the single-device runs: greedy tokens of a tiny qwen2_vl model
(4 query heads, 2 kv heads) for two left-padded prompts with images are the single-device tokens on every mesh, in
float32 and NF4; the weights and the KV cache are split as the mesh says; a model already on the mesh is used as it
is; `jaxvlm-generate --mesh` prints what it prints without."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jaxvlm import sharding
from tests import multidevice_generate
from tests.conftest import multidevice_env

REPO = Path(__file__).resolve().parent.parent
MESHES = ["tensor=2", "data=2,tensor=4", "fsdp=8"]  # tensor=2 on 2 of the 8 devices
PLACED = CLI_MESH = "data=2,tensor=4"  # compiled programs and placements of the runs above serve again
# Device 0's share of the KV cache: kv heads over "tensor" when it divides 2, the batch of 2 over data x fsdp when
# that divides it; fsdp=8 divides neither, so every device holds the whole cache.
CACHE_SHARE = {"tensor=2": 1 / 2, "data=2,tensor=4": 1 / 2, "fsdp=8": 1}


def test_cache_splits_kv_heads_over_tensor_and_the_batch_over_data_and_fsdp():
    kv = np.zeros((3, 4, 64, 2, 16))  # [layers, batch, slots, kv_heads, head_dim]
    assert sharding.cache_sharding(kv, 4, AbstractMesh((2, 1, 2), sharding.AXES)).spec == PartitionSpec(
        None, ("data", "fsdp"), None, "tensor", None)
    # A batch or head count that the mesh does not divide stays whole on that axis.
    assert sharding.cache_sharding(np.zeros((3, 3, 64, 2, 16)), 3, AbstractMesh((2, 1, 4), sharding.AXES)).spec == (
        PartitionSpec(None, None, None, None, None))
    # A per-sample array of fewer axes: by its batch axis.
    assert sharding.cache_sharding(np.zeros((4, 0)), 4, AbstractMesh((2, 2, 1), sharding.AXES)).spec == (
        PartitionSpec(("data", "fsdp")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from jaxvlm.tiny import save_random_model
    path = tmp_path_factory.mktemp("model")
    save_random_model(str(path), "qwen2_vl")
    return str(path)


@pytest.fixture(scope="module")
def results(model_dir, tmp_path_factory):
    """{(weights, mesh name): run} and [the CLI's runs]: the mesh runs from the subprocess, the single-device ones
    ("one") from this process, computed meanwhile."""
    env = multidevice_env(8)
    logs = tmp_path_factory.mktemp("logs")
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "tests.multidevice_generate", model_dir, "--mesh", *MESHES,
                                 "--placed", PLACED, "--cli-mesh", CLI_MESH], cwd=REPO, env=env, stdout=stdout,
                                stderr=stderr, text=True)
        try:
            runs = list(multidevice_generate.single_device(model_dir))
            code = proc.wait(timeout=1200)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0, (logs / "stderr").read_text()[-3000:]
    runs += [json.loads(line) for line in (logs / "stdout").read_text().splitlines() if line.startswith("{")]
    return {(r["weights"], r["mesh"]): r for r in runs if "weights" in r}, [r for r in runs if "cli_mesh" in r]


@pytest.mark.parametrize("weights", ["float32", "nf4"])
def test_tokens_on_every_mesh_equal_one_device(results, weights):
    runs, _ = results
    one = np.array(runs[weights, "one"]["tokens"])
    assert one.shape[0] == 2 and one.shape[1] > 8
    for name in MESHES:
        np.testing.assert_array_equal(runs[weights, name]["tokens"], one, err_msg=name)


@pytest.mark.parametrize("weights", ["float32", "nf4"])
def test_weights_and_kv_cache_are_split_over_the_mesh(results, weights):
    runs, _ = results
    for name in MESHES:
        r, sizes = runs[weights, name], sharding.parse_mesh(name)
        fsdp, tensor = sizes.get("fsdp", 1), sizes.get("tensor", 1)
        assert r["devices"] == (2 if name == "tensor=2" else 8)
        # q_proj [layers, out, in]: out over tensor, then in over fsdp; NF4's flat codes: their rows over tensor x fsdp
        assert r["q_proj_share"] == pytest.approx(1 / (tensor * fsdp)), name
        assert r["cache_share"] == pytest.approx(CACHE_SHARE[name]), (name, r["cache_spec"])


@pytest.mark.parametrize("weights", ["float32", "nf4"])
def test_a_model_already_on_the_mesh_is_used_as_it_is(results, weights):
    runs, _ = results
    placed = runs[weights, f"{PLACED} (placed)"]
    assert placed["same_model"]
    np.testing.assert_array_equal(placed["tokens"], runs[weights, "one"]["tokens"])


def test_generate_cli_mesh_prints_what_one_device_prints(results):
    _, (without, with_mesh) = results
    assert without["cli_mesh"] is None and with_mesh["cli_mesh"] == CLI_MESH
    assert without["code"] == with_mesh["code"] == 0
    assert without["text"].strip() and with_mesh["text"] == without["text"]


def test_a_mesh_that_does_not_fit_the_devices_is_a_value_error(model_dir, capsys):
    from jaxvlm import FastVisionModel
    from jaxvlm.cli import generate
    model, _ = FastVisionModel.from_pretrained(model_dir, dtype="float32")
    ids = np.ones((2, 4), np.int32)
    with pytest.raises(ValueError, match="tensor=2 holds 2 devices; there are 1"):
        model.generate(input_ids=ids, max_new_tokens=2, mesh="tensor=2")
    with pytest.raises(ValueError, match="'pipeline'"):
        model.generate(input_ids=ids, max_new_tokens=2, mesh="pipeline=2")
    assert generate.main(["--model", model_dir, "--prompt", "hi", "--mesh", "tensor=3"]) == 2
    assert "tensor=3 holds 3 devices" in capsys.readouterr().err
