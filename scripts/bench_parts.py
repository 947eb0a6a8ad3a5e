"""Where the time of a LoRA training step goes, by ablation (no profiler needed): times jit'd pieces of
the Qwen2-VL-2B-geometry step on the GPU, forward + backward each, median of 10 after a warm-up.

    python -m scripts.bench_parts --batch 8 --remat full

Pieces: the whole gradient step; the vision tower alone (with LoRA, and the base without LoRA, the
gradient taken w.r.t. the pixels so every block back-propagates); the language model alone (same two
ways) ; the loss alone (chunked vs all logits). One JSON line per piece.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from scripts.bench_common import batch_inputs, qwen2_vl_2b_config, random_model


def timed(name: str, fn, *args, **extra):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(bench="parts", piece=name, ms=round(1000 * float(np.median(times)), 2),
                          compile_s=round(compile_s, 1), **extra)), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--pieces", nargs="+", default=["step", "vision", "text", "loss"])
    args = ap.parse_args()
    from jaxvlm import FastVisionModel
    from jaxvlm.kernels.cross_entropy import chunked_token_loss_sum, token_loss_sum
    from jaxvlm.train.trainer import default_is_trainable, split_trainable
    cfg = qwen2_vl_2b_config()
    base = random_model(cfg, jnp.bfloat16)
    base.max_seq_length = 2048
    model = FastVisionModel.get_peft_model(base, r=16, lora_alpha=16)
    for m in (base, model):
        FastVisionModel.for_training(m, use_gradient_checkpointing=False if args.remat == "none" else args.remat)
    x = jax.device_put(batch_inputs(cfg, args.batch, 256, 448))
    labels = np.asarray(x["input_ids"]).copy()
    labels[:, :258] = -100
    labels = jnp.asarray(labels)
    trainable, frozen, rebuild, _ = split_trainable(model, default_is_trainable(model))
    _, bfrozen, brebuild, _ = split_trainable(base, lambda path: False)
    pix = x["pixel_values"].astype(jnp.bfloat16)
    extra = dict(batch=args.batch, remat=args.remat, device=jax.devices()[0].device_kind)

    # Everything a piece reads is an argument: closed-over arrays would become constants of the program.
    if "step" in args.pieces:
        def loss(t, frozen, x):
            m = rebuild(t, frozen)
            return chunked_token_loss_sum(m.logits, m.hidden_states(x), x["labels"])[0]
        timed("step: grad of the loss w.r.t. LoRA", jax.jit(jax.grad(loss)), trainable, frozen,
              {**x, "labels": labels}, **extra)
    if "vision" in args.pieces:
        def vis(t, p, frozen, x):
            m = rebuild(t, frozen)
            return jnp.sum(m.model.visual(p, x).astype(jnp.float32))
        timed("vision: grad w.r.t. LoRA", jax.jit(jax.grad(vis)), trainable, pix, frozen, x, **extra)

        def vis_base(p, bfrozen, x):
            return jnp.sum(brebuild([], bfrozen).model.visual(p, x).astype(jnp.float32))
        timed("vision without LoRA: grad w.r.t. pixels", jax.jit(jax.grad(vis_base)), pix, bfrozen, x, **extra)
        timed("vision forward", jax.jit(lambda p, bfrozen, x: brebuild([], bfrozen).model.visual(p, x)), pix,
              bfrozen, x, **extra)
    h0 = jnp.asarray(np.random.default_rng(0).standard_normal((*x["input_ids"].shape, cfg.text.hidden_size)) * 0.02,
                     jnp.bfloat16)
    if "text" in args.pieces:
        def txt(t, h, frozen, x):
            m = rebuild(t, frozen)
            out, _ = m.model.language_model(h, x["position_ids"], x["attention_mask"])
            return jnp.sum(out.astype(jnp.float32))
        timed("text layers: grad w.r.t. LoRA", jax.jit(jax.grad(txt)), trainable, h0, frozen, x, **extra)

        def txt_base(h, bfrozen, x):
            out, _ = brebuild([], bfrozen).model.language_model(h, x["position_ids"], x["attention_mask"])
            return jnp.sum(out.astype(jnp.float32))
        timed("text layers without LoRA: grad w.r.t. input", jax.jit(jax.grad(txt_base)), h0, bfrozen, x, **extra)
    if "loss" in args.pieces:
        timed("loss chunked 512: grad w.r.t. hidden", jax.jit(jax.grad(
            lambda h, f, y: chunked_token_loss_sum(brebuild([], f).logits, h, y)[0])), h0, bfrozen, labels, **extra)
        timed("loss all logits: grad w.r.t. hidden", jax.jit(jax.grad(
            lambda h, f, y: token_loss_sum(brebuild([], f).logits(h), y)[0])), h0, bfrozen, labels, **extra)


if __name__ == "__main__":
    main()
