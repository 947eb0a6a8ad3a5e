"""Greedy generation of a tiny model on device meshes, in float32 and NF4, and `jaxvlm-generate --mesh`; prints one
JSON line per run (tokens, the share of a q_proj weight and of the KV cache that device 0 holds). Run in a subprocess
with 8 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) by tests/test_generate_sharding.py,
which computes the single-device runs (`single_device`) in its own process meanwhile."""
import argparse
import contextlib
import io
import json
import sys

WEIGHTS = ("float32", "nf4")
MESH_DEVICES = {"tensor=2": 2}  # meshes on fewer than all 8 devices: their device count


def load(model_dir, weights):
    """(model, a batch of two left-padded prompts with an image each, generate's keyword arguments)."""
    from jaxvlm import FastVisionModel
    from tests.conftest import chat, random_image
    model, processor = FastVisionModel.from_pretrained(model_dir, dtype="float32", load_in_4bit=weights == "nf4")
    FastVisionModel.for_inference(model)
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(chat(t, 1), tokenize=False, add_generation_prompt=True)
             for t in ("describe the image", "what is this digit in the image then tell me why")]
    images = [[random_image(56, 56, seed=3)], [random_image(84, 56, seed=4)]]  # per prompt: every family's processor
    batch = dict(processor(text=texts, images=images, return_tensors="np", padding=True))
    return model, batch, dict(max_new_tokens=8, eos_token_id=-1, pad_token_id=processor.tokenizer.pad_token_id)


def cli(model_dir, mesh):
    """What `jaxvlm-generate` prints about one image, with `--mesh mesh` (None: without)."""
    import tempfile

    from jaxvlm.cli import generate
    from tests.conftest import random_image
    with tempfile.TemporaryDirectory() as tmp:
        image = f"{tmp}/image.png"
        random_image(56, 56, seed=3).save(image)
        argv = ["--model", model_dir, "--image", image, "--prompt", "describe the image", "--max-new-tokens", "8",
                "--dtype", "float32"] + (["--mesh", mesh] if mesh else [])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = generate.main(argv)
    return {"cli_mesh": mesh, "code": code, "text": out.getvalue()}


def single_device(model_dir):
    """The runs on one device, without a mesh: tokens for each weight type, then the CLI's text."""
    for weights in WEIGHTS:
        model, batch, kw = load(model_dir, weights)
        assert (batch["attention_mask"][:, 0] == 0).any(), "one prompt should be left-padded"
        yield {"weights": weights, "mesh": "one", "tokens": model.generate(**batch, **kw).tolist()}
    yield cli(model_dir, None)


def share(array, device):
    """The fraction of `array`'s bytes that `device` holds."""
    return sum(s.data.nbytes for s in array.addressable_shards if s.device == device) / array.nbytes


def spy_on_decode_loop():
    """A dict that receives the model that jaxvlm.generate hands its decode loop and, of the cache it hands it (placed
    as it placed them), the first array's share held by device 0 and its sharding's spec (read before the call: the
    loop takes the cache's buffers over)."""
    import jax

    from jaxvlm import generate
    seen, original = {}, generate._decode_loop

    def decode_loop(model, cache, *args, **kwargs):
        k_cache = jax.tree.leaves(cache)[0]
        seen.update(model=model, cache_share=share(k_cache, jax.devices()[0]), cache_spec=str(k_cache.sharding.spec))
        return original(model, cache, *args, **kwargs)
    generate._decode_loop = decode_loop
    return seen


def on_meshes(model_dir, meshes, placed):
    """For each weight type: the runs on `meshes` (by name; generate places the model), then one on a model placed on
    the mesh `placed` beforehand."""
    import jax

    from jaxvlm import sharding
    seen = spy_on_decode_loop()
    device = jax.devices()[0]
    for weights in WEIGHTS:
        model, batch, kw = load(model_dir, weights)
        for name in meshes:
            n = MESH_DEVICES.get(name, jax.device_count())
            mesh = name if n == jax.device_count() else sharding.make_mesh(name, jax.devices()[:n])
            tokens = model.generate(**batch, **kw, mesh=mesh)
            q_proj = seen["model"].model.language_model.layers.self_attn.q_proj.weight.get_value()
            yield {"weights": weights, "mesh": name, "devices": n, "tokens": tokens.tolist(),
                   "q_proj_share": share(max(jax.tree.leaves(q_proj), key=lambda a: a.size), device),  # NF4: codes
                   "cache_share": seen["cache_share"], "cache_spec": seen["cache_spec"]}
        on_mesh = sharding.shard_model(model, sharding.make_mesh(placed))
        tokens = on_mesh.generate(**batch, **kw, mesh=placed)
        yield {"weights": weights, "mesh": f"{placed} (placed)", "tokens": tokens.tolist(),
               "same_model": seen["model"] is on_mesh}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--mesh", nargs="+", required=True, help="data=..,fsdp=..,tensor=.. (tensor=2: on 2 devices)")
    p.add_argument("--placed", required=True, help="the mesh of a model placed before generate is called")
    p.add_argument("--cli-mesh", required=True, help="jaxvlm-generate's --mesh")
    a = p.parse_args(argv)
    for result in on_meshes(a.model_dir, a.mesh, a.placed):
        print(json.dumps(result), flush=True)
    print(json.dumps(cli(a.model_dir, a.cli_mesh)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
