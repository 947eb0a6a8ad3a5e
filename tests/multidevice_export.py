"""Run in a subprocess with 8 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): exports a
tiny NF4 + LoRA model (random nonzero lora_B) from one device and sharded on "fsdp=4,tensor=2", as merged 16-bit,
merged 4-bit and a PEFT adapter, into <out>/one/<method> and <out>/mesh/<method>, recording the shape of every
device array the sharded exports bring to the host (`hf_export.host_array`). Prints one JSON line: how many param
leaves the mesh splits, the stacks' layer counts, and {method: [shapes gathered]}. tests/test_export_sharding.py
starts it; the main pytest process has one device."""
import json
import os
import sys

METHODS = ("merged_16bit", "merged_4bit", "lora")


def lora_model(model_dir):
    """The tiny model from `model_dir`, NF4, with r=8 LoRA on every Linear and lora_B drawn nonzero."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxvlm import FastVisionModel
    from jaxvlm.lora import LoRA
    model, _ = FastVisionModel.from_pretrained(model_dir, load_in_4bit=True, dtype="float32")
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        if isinstance(value, LoRA):
            b = rng.normal(0, 0.1, value.lora_B.shape).astype(np.float32)
            var.set_value(dataclasses.replace(value, lora_B=jnp.asarray(b)))
    return model


def export_all(model, out_dir):
    """{method: [shapes of the device arrays brought to the host]} of exporting `model` by each method into
    out_dir/method."""
    import jax

    from jaxvlm.converters import hf_export
    gather = hf_export.host_array
    gathered = []

    def recording(x):
        if isinstance(x, jax.Array):
            gathered.append(list(x.shape))
        return gather(x)
    hf_export.host_array = recording
    shapes = {}
    try:
        for method in METHODS:
            gathered.clear()
            model.save_pretrained_merged(os.path.join(out_dir, method), save_method=method)
            shapes[method] = list(gathered)
    finally:
        hf_export.host_array = gather
    return shapes


def main(model_dir, out_dir):
    import jax
    from flax import nnx

    from jaxvlm.converters.hf_export import num_layers
    from jaxvlm.paths import path_key, stacked_prefix
    from jaxvlm.sharding import make_mesh, shard_model
    assert jax.device_count() == 8, jax.devices()
    model = lora_model(model_dir)
    export_all(model, os.path.join(out_dir, "one"))
    sharded = shard_model(model, make_mesh("fsdp=4,tensor=2"))
    params = nnx.to_flat_state(nnx.state(sharded, nnx.Param))
    split = sum(not x.sharding.is_fully_replicated for _, var in params for x in jax.tree.leaves(var.get_value()))
    layers = {num_layers(var.get_value()) for path, var in params if stacked_prefix(path_key(path), model.stacks())}
    shapes = export_all(sharded, os.path.join(out_dir, "mesh"))
    print(json.dumps({"split_leaves": split, "layers": sorted(layers), "gathered": shapes}), flush=True)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
