"""Loading a checkpoint straight into the shards of a device mesh (`FastVisionModel.from_pretrained(mesh=...)`).

The slice reader and the load's errors are checked here on one device. The loads themselves run in one subprocess
with 8 forced CPU devices (tests/multidevice_load.py), for a tiny Qwen2-VL in float32 and in NF4 on the meshes
fsdp=4 x tensor=2 and fsdp=8: every leaf holds the bits of the model loaded on one device and has the sharding that
`shard_model` gives it, the forward's logits are those of the one-device model, `shard_model` then moves nothing,
and the loader reads each checkpoint byte once, device 0's blocks being total / fsdp of them (less with tensor
parallelism)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxvlm import FastVisionModel
from jaxvlm.converters.safetensors_io import Checkpoint, CheckpointError
from jaxvlm.sharding import parse_mesh
from tests.conftest import multidevice_env

REPO = Path(__file__).resolve().parent.parent
MESHES = ["fsdp=4,tensor=2", "fsdp=8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from jaxvlm.tiny import save_random_model
    path = tmp_path_factory.mktemp("model")
    save_random_model(str(path), "qwen2_vl")
    return path


def test_read_slice_reads_the_block_of_the_full_tensor(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((6, 10, 4)).astype(np.float32),
               "bf16": rng.standard_normal((8, 12, 6)).astype(ml_dtypes.bfloat16),
               "scalar": np.array(3, np.int64)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(str(tmp_path))
    blocks = [(), (slice(2, 5),), (slice(0, 6), slice(3, 8)), (slice(1, 2), slice(None), slice(2, 4)),
              (slice(4, 4),)]
    for key in ("f32", "bf16"):
        for index in blocks:
            block = ckpt.read_slice(key, index)
            expected = tensors[key][index]
            assert block.dtype == tensors[key].dtype and block.shape == expected.shape, (key, index)
            assert block.tobytes() == expected.tobytes(), (key, index)
            assert block.flags.owndata and block.flags.writeable  # a copy, not a view of the mapped file
    assert ckpt.read_slice("scalar", ()) == 3


@pytest.mark.parametrize("index", [(slice(0, 7),), (slice(0, 2, 2),), (slice(3, 1),), (slice(None),) * 3])
def test_read_slice_refuses_a_block_outside_the_tensor(tmp_path, index):
    save_file({"w": np.zeros((6, 10), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"w: block .* does not fit the tensor's shape \(6, 10\)"):
        Checkpoint(str(tmp_path)).read_slice("w", index)


def test_misshaped_tensor_on_a_mesh_names_key_and_both_shapes(model_dir, tmp_path):
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.language_model.layers.2.mlp.up_proj.weight"] = np.zeros((127, 64), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.language_model\.layers\.2\.mlp\.up_proj\.weight' has shape "
                                              r"\(127, 64\), the model expects \(128, 64\)"):
        FastVisionModel.from_pretrained(str(tmp_path), dtype="float32", load_in_4bit=True, mesh="fsdp=1")


@pytest.fixture(scope="module")
def loads(model_dir):
    """The JSON lines of tests/multidevice_load.py run with 8 CPU devices on `MESHES`, by (mesh, load_in_4bit)."""
    env = multidevice_env(8)
    out = subprocess.run([sys.executable, "-m", "tests.multidevice_load", str(model_dir), *MESHES], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["mesh"], r["load_in_4bit"]) for r in results] == [(m, q) for q in (False, True) for m in MESHES]
    return {(r["mesh"], r["load_in_4bit"]): r for r in results}


def test_every_leaf_has_the_bits_of_the_one_device_load_and_the_sharding_of_shard_model(loads):
    for (mesh, load_in_4bit), r in loads.items():
        assert r["devices"] == 8 and r["leaves"] > 30
        assert r["value_diff"] == [], (mesh, load_in_4bit)
        assert r["sharding_diff"] == [], (mesh, load_in_4bit)


def test_logits_equal_the_one_device_logits(loads):
    assert loads[MESHES[0], True]["logits_error"] < 1e-5


def test_shard_model_then_moves_nothing(loads):
    assert all(r["moved_by_shard_model"] == 0 for r in loads.values())


def test_each_byte_is_read_once_and_device_0_reads_its_share(loads):
    for (mesh, _), r in loads.items():
        assert r["read_by_process"] == r["checkpoint_bytes"], mesh
        share = r["read_for_device0"] * parse_mesh(mesh)["fsdp"] / r["checkpoint_bytes"]
        if "tensor" in mesh:  # tensor parallelism splits the Linear weights further
            assert 0.5 < share <= 1.0, (mesh, r)
        else:
            assert abs(share - 1) < 0.03, (mesh, r)
