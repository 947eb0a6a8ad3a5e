"""Device meshes (jaxvlm.sharding) and training on them. The rules are checked here on abstract meshes; training runs
in a subprocess with 8 forced CPU devices (tests/multidevice.py), since this process has one: for each mesh shape
(8x1x1, 1x8x1, 2x4x1, 2x2x2, 1x4x2 as data x fsdp x tensor) the losses of 5 LoRA steps on an NF4 model at the same
global batch equal the single-device losses, each device holds total / fsdp of the model's bytes, a checkpoint
written on one mesh resumes on another with the same next losses, and `jaxvlm-train --mesh` trains on the mesh
it names."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jaxvlm import sharding

REPO = Path(__file__).resolve().parent.parent
MESHES = ["data=8", "fsdp=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"]


def mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), sharding.AXES)


def test_parse_mesh_takes_axis_sizes_and_names_what_is_wrong():
    assert sharding.parse_mesh("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    assert sharding.parse_mesh({"tensor": 2}) == {"tensor": 2}
    assert sharding.parse_mesh(None) == {}
    for bad, message in [("data:2", "axis=size pairs"), ("pipeline=2", "'pipeline'"), ("data=0", "positive"),
                         ("data=2,data=2", "twice"), ("fsdp=x", "axis=size pairs")]:
        with pytest.raises(ValueError, match=message):
            sharding.parse_mesh(bad)


def test_make_mesh_needs_the_sizes_to_cover_the_devices():
    import jax
    m = sharding.make_mesh(None)  # one device here: all of it on fsdp
    assert dict(m.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    with pytest.raises(ValueError, match="must multiply to the device count"):
        sharding.make_mesh("data=2,fsdp=4")


def test_generic_rule_splits_the_largest_divisible_axis_never_the_layer_axis():
    spec = sharding.leaf_spec
    # A stacked dense weight [layers, out, in]: fsdp on the larger of out / in that 4 divides.
    assert spec(["layers", "mlp", "up_proj", "weight"], (6, 96, 40), 1, mesh(fsdp=4)) == PartitionSpec(None, "fsdp",
                                                                                                       None)
    assert spec(["layers", "mlp", "up_proj", "weight"], (8, 30, 40), 1, mesh(fsdp=4)) == PartitionSpec(None, None,
                                                                                                       "fsdp")
    # NF4's flat codes and absmax: split along their one axis (an output-axis split of the weight).
    assert spec(["layers", "q_proj", "weight", "base", "codes"], (6, 2048), 1, mesh(fsdp=8)) == PartitionSpec(
        None, "fsdp")
    # With a tensor axis, a column-parallel NF4's flat arrays split their output rows over tensor x fsdp; a
    # row-parallel one's (its input axis is not contiguous in them) over fsdp only.
    nf4 = ["layers", "mlp", "up_proj", "weight", "base"]
    assert spec(nf4 + ["codes"], (6, 2048), 1, mesh(fsdp=4, tensor=2)) == PartitionSpec(None, ("tensor", "fsdp"))
    assert spec(nf4 + ["absmax"], (6, 6), 1, mesh(fsdp=4, tensor=2)) == PartitionSpec(None, "tensor")
    assert spec(["layers", "mlp", "down_proj", "weight", "codes"], (6, 2048), 1, mesh(fsdp=4, tensor=2)) == (
        PartitionSpec(None, "fsdp"))
    # Nothing divides: replicated.
    assert spec(["norm", "weight"], (7,), 0, mesh(fsdp=4)) == PartitionSpec(None)
    # Tensor parallel: column-parallel Linears by output, row-parallel by input; LoRA's factors on their own side.
    t = mesh(fsdp=2, tensor=2)
    assert spec(["layers", "self_attn", "q_proj", "weight"], (4, 64, 48), 1, t) == PartitionSpec(None, "tensor",
                                                                                                  "fsdp")
    assert spec(["layers", "self_attn", "o_proj", "weight"], (4, 48, 64), 1, t) == PartitionSpec(None, "fsdp",
                                                                                                  "tensor")
    assert spec(["layers", "self_attn", "q_proj", "weight", "lora_B"], (4, 64, 8), 1, t) == PartitionSpec(
        None, "tensor", "fsdp")
    assert spec(["layers", "self_attn", "o_proj", "weight", "lora_A"], (4, 8, 64), 1, t) == PartitionSpec(
        None, "fsdp", "tensor")
    # A family's rule wins.
    assert spec(["model", "visual", "merger", "weight"], (64, 48), 0, t,
                rules=[(r"visual\.merger", (None, None))]) == PartitionSpec(None, None)


def test_batch_arrays_split_over_data_and_fsdp_packed_ones_replicated():
    import jax
    m = sharding.make_mesh(None)
    assert sharding.batch_sharding(np.zeros((4, 16)), 4, m).spec == PartitionSpec(("data", "fsdp"))
    assert sharding.batch_sharding(np.zeros((3, 4, 16)), 4, m).spec == PartitionSpec(None, ("data", "fsdp"))
    assert sharding.batch_sharding(np.zeros((100, 588)), 4, m).spec == PartitionSpec()
    assert jax.device_count() == 1


@pytest.fixture(scope="module")
def mesh_runs(multidevice, tmp_path_factory):
    """The 5-step runs on one device and on each of MESHES, in one subprocess: [one, *meshes]."""
    run, _, _ = multidevice
    return run("--mesh", "one", *MESHES, "--out", str(tmp_path_factory.mktemp("meshes")))


def test_losses_on_every_mesh_equal_one_device_and_each_device_holds_its_share(mesh_runs):
    one, *rest = mesh_runs
    assert one["devices"] == 1 and len(one["losses"]) == 5 and one["losses"][-1] < one["losses"][0]
    assert one["shard_layout"] is None
    for r, name in zip(rest, MESHES):
        assert r["devices"] == 8 and r["mesh"] == name
        np.testing.assert_allclose(r["losses"], one["losses"], rtol=1e-5, err_msg=name)
        # Per-shard batches: every input is [data x fsdp, ...], device 0 holding its own shard's row alone (its own
        # images' patches: the vision tower runs on them only).
        shards = sharding.parse_mesh(name).get("data", 1) * sharding.parse_mesh(name).get("fsdp", 1)
        for key, (shape, block) in r["shard_layout"].items():
            assert shape[0] == shards and block == [1, *shape[1:]], (name, key, shape, block)
        assert "pixel_values" in r["shard_layout"], name
        # One process: each micro-batch's shards are made on the prefetch thread (the first as it is asked for, the
        # rest one step ahead), not on the loop's thread between steps.
        made_on = r["made_on"]
        assert len(made_on) == 5 and all(t.startswith("jaxvlm-prefetch") for t in made_on), (name, made_on)
        fsdp = sharding.parse_mesh(name).get("fsdp", 1)
        if "tensor" not in name:  # FSDP alone: each device holds total / fsdp (within a few %)
            assert abs(r["device0_bytes"] * fsdp / r["total_bytes"] - 1) < 0.03, (name, r)
        else:  # tensor parallel splits further
            assert r["device0_bytes"] * fsdp < 1.01 * r["total_bytes"], (name, r)


def test_a_checkpoint_saved_on_one_mesh_resumes_on_another(multidevice, tmp_path):
    run, _, _ = multidevice
    (full,) = run("--mesh", "data=2,fsdp=4", "--save-steps", "3", "--out", str(tmp_path / "a"))
    assert (tmp_path / "a" / "checkpoint-3").is_dir()
    (resumed,) = run("--mesh", "fsdp=4,tensor=2", "--resume", str(tmp_path / "a" / "checkpoint-3"),
                     "--out", str(tmp_path / "b"))
    assert resumed["steps"] == [4, 5]
    np.testing.assert_allclose(resumed["losses"], full["losses"][3:], rtol=1e-5)


def test_train_cli_mesh(multidevice, tmp_path):
    """`jaxvlm-train --mesh`: the batch size is per data x fsdp coordinate, so two meshes of 8 devices at
    --batch-size 1 train on the same 8-sample batches, with the same losses."""
    _, model_dir, env = multidevice
    from tests.test_cli import write_records
    data = write_records(tmp_path / "data")
    losses = []
    for name in ("fsdp=8", "data=2,fsdp=2,tensor=2"):
        out = tmp_path / name.replace(",", "_").replace("=", "")
        args = ["--model", model_dir, "--data", str(data), "--output", str(out), "--max-steps", "2", "--rank", "4",
                "--batch-size", "1" if "tensor" not in name else "2", "--grad-accum", "1", "--mesh", name,
                "--load-in-4bit", "--dtype", "float32", "--optim", "adamw_torch"]
        code = f"import sys; from jaxvlm.cli import train; sys.exit(train.main({args!r}))"
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "trained 2 steps" in result.stdout
        losses.append([r["loss"] for r in json.loads((out / "log_history.json").read_text())])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_shard_model_keeps_the_users_settings():
    """shard_model's model keeps what from_pretrained set on the model (fast_generate's slots among them): plain
    attributes ride in the module's graphdef, no list of them to keep up."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxvlm.tiny import _family, tiny_config
    family = _family("qwen2_vl")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: family(family.config_from_hf(tiny_config("qwen2_vl")),
                                                              jnp.float32)))
    model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
    model.max_seq_length, model.fast_inference, model.max_num_seqs, model.name_or_path = 512, True, 3, "tiny"
    model.training, model.use_gradient_checkpointing = True, "unsloth"
    placed = sharding.shard_model(model, sharding.make_mesh("data=1"))
    assert (placed.max_seq_length, placed.fast_inference, placed.max_num_seqs, placed.name_or_path, placed.training,
            placed.use_gradient_checkpointing) == (512, True, 3, "tiny", True, "unsloth")
