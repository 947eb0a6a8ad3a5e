"""Run in a subprocess with several forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8):
trains each tiny NF4 + LoRA model given for a few steps on each mesh asked for and prints one JSON line per run
(losses, per-device param bytes); with --generate, also its greedy tokens on each mesh (one more line each).
tests/test_sharding.py starts it; the main pytest process has one device."""
import argparse
import json
import sys
import threading


def records(n):
    """Records of 1, 2, 1 and no images of varied sizes: data-parallel shards of different shapes."""
    import numpy as np
    from PIL import Image
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        images = [Image.fromarray(rng.integers(0, 256, (28 + 7 * ((i + j) % 3), 35, 3), dtype=np.uint8))
                  for j in range((1, 2, 1, 0)[i % 4])]
        out.append({"messages": [
            {"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": "which digit" + " please" * (i % 3)}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"the digit is {i % 10}"}]}]})
    return out


def shard_layout(trainer):
    """{input: [global shape, device 0's block shape]} of the first micro-batch as the trainer places it, or None when
    the trainer collates the global batch (no per-shard batches)."""
    import jax

    from jaxvlm.sharding import local_shards, place_shards
    if not trainer.per_shard():
        return None
    shards = local_shards(trainer.mesh)
    batches, _ = trainer.shard_batches(0, shards)
    placed = place_shards(trainer.shard_inputs(batches), shards, trainer.mesh)
    device0 = jax.local_devices()[0]
    return {k: [list(v.shape), next(list(s.data.shape) for s in v.addressable_shards if s.device == device0)]
            for k, v in placed.items()}


def train(model_dir, mesh, steps, global_batch, out_dir, save_steps=0, resume=None):
    import jax
    from jaxvlm import FastVisionModel
    from jaxvlm.sharding import BATCH_AXES, make_mesh, mesh_size
    from jaxvlm.train import VisionDataCollator
    from jaxvlm.train.trainer import SFTConfig, SFTTrainer
    mesh = make_mesh(None, jax.devices()[:1]) if mesh == "one" else make_mesh(mesh)
    model, processor = FastVisionModel.from_pretrained(model_dir, load_in_4bit=True, dtype="float32")
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    dp = mesh_size(mesh, BATCH_AXES)
    args = SFTConfig(per_device_train_batch_size=global_batch // dp, gradient_accumulation_steps=1, max_steps=steps,
                     learning_rate=5e-3, warmup_steps=1, optim="adamw_torch", seed=0, output_dir=out_dir,
                     save_steps=save_steps, mesh=mesh, logging_steps=0)
    trainer = SFTTrainer(model, processor, VisionDataCollator(model, processor, train_on_responses_only=True),
                         records(16), args=args)
    made_on = {}  # micro-batch index -> the thread that made its per-shard inputs
    placed_shards = trainer._placed_shards

    def recorded(index, **kw):
        made_on[index] = threading.current_thread().name
        return placed_shards(index, **kw)

    trainer._placed_shards = recorded
    trainer.train(resume_from_checkpoint=resume)
    from flax import nnx
    leaves = jax.tree.leaves(nnx.state(trainer.model))
    total = sum(x.nbytes for x in leaves)
    device0 = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == jax.devices()[0])
    return {"losses": [r["loss"] for r in trainer.log_history], "steps": [r["step"] for r in trainer.log_history],
            "shard_layout": shard_layout(trainer), "made_on": [made_on[i] for i in sorted(made_on)],
            "total_bytes": total, "device0_bytes": device0, "devices": int(mesh.size),
            "process": jax.process_index(), "processes": jax.process_count()}


def greedy(model_dir, mesh):
    """Greedy tokens of the tiny NF4 model (no adapter) on `mesh` ('one': a single device, no mesh), for
    tests/multidevice_generate.py's two left-padded prompts with an image each."""
    import numpy as np

    from jaxvlm.sharding import make_mesh
    from tests.multidevice_generate import load
    model, batch, kw = load(model_dir, "nf4")
    tokens = model.generate(**batch, **kw, mesh=None if mesh == "one" else make_mesh(mesh))
    return {"tokens": np.asarray(tokens).tolist(), "left_padded": bool((batch["attention_mask"][:, 0] == 0).any())}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("model_dir", nargs="+", help="one or more model directories, each trained on every mesh")
    p.add_argument("--mesh", nargs="+", required=True, help="'one' (a single device) or data=..,fsdp=..,tensor=..")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--out", default="/tmp/multidevice")
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume", default=None, help="a checkpoint directory to resume from")
    p.add_argument("--generate", action="store_true", help="also greedy tokens on each mesh (a JSON line each)")
    a = p.parse_args(argv)
    from jaxvlm.sharding import initialize_distributed
    initialize_distributed()  # several processes when JAX_COORDINATOR_ADDRESS etc. say so
    for model_dir in a.model_dir:
        for mesh in a.mesh:
            result = train(model_dir, mesh, a.steps, a.global_batch, a.out, a.save_steps, a.resume)
            print(json.dumps({"model_dir": model_dir, "mesh": mesh, **result}), flush=True)
            if a.generate:
                print(json.dumps({"model_dir": model_dir, "mesh": mesh, "generated": greedy(model_dir, mesh)}),
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
