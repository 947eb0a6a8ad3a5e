"""First compile + forward time of the Qwen2-VL-2B geometry with random weights (run on the GPU).

    python scripts/bench_forward.py [--batch 4] [--text 256] [--image 448] [--dtype bfloat16]

Prints one JSON line per batch size: compile+first-call seconds, steady forward seconds (median of 10),
tokens/s and peak device memory. No checkpoint is read: weights are random, drawn on the device.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.models import qwen2_vl


def _qwen2_vl_hf_config(hidden, intermediate, heads, kv_heads, vocab, tied):
    from transformers import Qwen2VLConfig
    return Qwen2VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=28,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, rope_theta=1e6,
                         max_position_embeddings=32768, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=hidden, mlp_ratio=4, num_heads=16, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=tied)


def qwen2_vl_2b_hf_config():
    """transformers' config of the Qwen2-VL-2B geometry (the benchmark workload)."""
    return _qwen2_vl_hf_config(1536, 8960, 12, 2, 151936, tied=True)


def qwen2_vl_7b_hf_config():
    """transformers' config of the Qwen2-VL-7B geometry (text 3584 wide, 28 layers, 28 heads, 4 kv heads)."""
    return _qwen2_vl_hf_config(3584, 18944, 28, 4, 152064, tied=False)


def qwen2_vl_2b_config():
    return qwen2_vl.from_hf(qwen2_vl_2b_hf_config())


GEOMETRIES = {"qwen2-vl-2b": qwen2_vl_2b_hf_config, "qwen2-vl-7b": qwen2_vl_7b_hf_config}


def geometry_config(name: str):
    return qwen2_vl.from_hf(GEOMETRIES[name]())


def random_model(cfg, dtype, seed=0, nf4=False):
    """Random weights drawn on the device; with `nf4`, each Linear weight is quantized as soon as it is
    drawn (as load_in_4bit does), so the 16-bit model never exists whole."""
    from jaxvlm.converters.hf_import import path_key
    from jaxvlm.fast_vision_model import linear_weight_keys
    from jaxvlm.quant import quantize_nf4
    abstract = nnx.eval_shape(lambda: qwen2_vl.build(cfg, dtype))
    targets = linear_weight_keys(abstract, qwen2_vl.QUANT_SKIP) if nf4 else set()
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    filled = []
    for (p, v), k in zip(flat, keys):
        w = 0.02 * jax.random.normal(k, v.get_value().shape, dtype)
        if path_key(p) in targets:
            w = jax.block_until_ready(jax.vmap(quantize_nf4)(w))
        filled.append((p, v.replace(w)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def batch_inputs(cfg, batch, text, image):
    grid = image // cfg.vision.patch_size
    n_img = grid * grid // cfg.vision.spatial_merge_size**2
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150000, (batch, n_img + text + 2))
    ids[:, 0] = cfg.vision_start_token_id
    ids[:, 1:1 + n_img] = cfg.image_token_id
    ids[:, 1 + n_img] = cfg.vision_start_token_id + 1
    pix = rng.standard_normal((batch * grid * grid, cfg.vision.patch_dim)).astype(np.float32)
    thw = np.array([[1, grid, grid]] * batch)
    return qwen2_vl.prepare_inputs(cfg, input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pix,
                                   image_grid_thw=thw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    cfg = qwen2_vl_2b_config()
    t0 = time.perf_counter()
    model = random_model(cfg, dtype)
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - t0
    forward = nnx.jit(lambda m, x: m.forward(x))
    for b in args.batch:
        inputs = jax.device_put(batch_inputs(cfg, b, args.text, args.image))
        t0 = time.perf_counter()
        jax.block_until_ready(forward(model, inputs))
        first = time.perf_counter() - t0
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(model, inputs))
            times.append(time.perf_counter() - t0)
        step = float(np.median(times))
        stats = jax.devices()[0].memory_stats() or {}
        tokens = inputs["input_ids"].size
        print(json.dumps(dict(
            bench="forward", geometry="qwen2-vl-2b", device=jax.devices()[0].device_kind, dtype=args.dtype, batch=b,
            seq=int(inputs["input_ids"].shape[1]), random_init_s=round(init_s, 2), compile_and_first_s=round(first, 2),
            forward_s=round(step, 4), tokens_per_s=round(tokens / step), peak_gib=round(
                stats.get("peak_bytes_in_use", 0) / 2**30, 2))))


if __name__ == "__main__":
    main()
