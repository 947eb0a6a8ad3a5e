"""The decode-attention kernel (jaxvlm.kernels.decode_attention) against XLA's writes + attention
(jaxvlm.layers.cached_attention_xla), on the GPU.

    PYTHONPATH=. python -m scripts.bench_decode_attention              # decode shapes of the 2B/7B geometries
    PYTHONPATH=. python -m scripts.bench_decode_attention --cpu-check  # tiny shapes, the kernel in interpret mode

Each shape: a stacked bf16 cache of 28 layers; one step's q, k, v per layer. First the kernel's output against
XLA's (max abs difference, in bf16) and its caches against XLA's (the same: 0 expected); then both timed as a decode
step's layer loop (one jit, the 28 layers unrolled, the cache donated and written in place, each layer's output
feeding the next layer's q so that nothing is hoisted), `us` the median of 20 steps per layer. One JSON line per
(shape, variant); variants: XLA, the kernel's default config, and other splits of the slots.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels import decode_attention as da
from jaxvlm.layers import cached_attention_xla

LAYERS = 28
# (name, batch, heads, kv_heads, head_dim, slots, slot written)
SHAPES = [("2b-b1", 1, 12, 2, 128, 448, 300), ("2b-b1-long", 1, 12, 2, 128, 4096, 4000),
          ("2b-engine", 64, 12, 2, 128, 896, None), ("7b-b1", 1, 28, 4, 128, 448, 300),
          ("qwen3-2b-b1", 1, 16, 8, 128, 448, 300), ("gemma3-4b-b1", 1, 8, 4, 256, 448, 300),
          ("gemma3-4b-engine", 64, 8, 4, 256, 896, None)]
TINY = [("tiny", 2, 6, 2, 16, 64, None)]


def operands(batch, heads, kv_heads, d, slots, slot, layers, dtype):
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    index = jnp.asarray(rng.integers(0, slots, batch) if slot is None else [slot] * batch, jnp.int32)
    mask = jnp.asarray(np.arange(slots)[None] <= np.asarray(index)[:, None])[:, None, None, :]
    return (normal(batch, 1, heads, d), normal(batch, 1, kv_heads, d), normal(batch, 1, kv_heads, d),
            normal(layers, batch, slots, kv_heads, d), normal(layers, batch, slots, kv_heads, d), index, mask)


def step_fn(kernel, layers, **config):
    def step(q, k, v, kc, vc, index, mask):
        for layer in range(layers):
            if kernel:
                out, kc, vc = da.decode_attention(q, k, v, kc, vc, layer, index, mask, **config)
            else:
                out, (kc, vc) = cached_attention_xla(q, k, v, (kc, vc), index, layer, mask)
            q = q + out[..., :1] * 1e-3  # chained, so no layer is hoisted or dropped
        return q, kc, vc
    return jax.jit(step, donate_argnums=(3, 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--shapes", nargs="*", help="only these shapes (default: all): " + ", ".join(s[0] for s in SHAPES))
    args = ap.parse_args()
    interpret = args.cpu_check
    shapes, layers, dtype = (TINY, 2, jnp.float32) if interpret else (SHAPES, LAYERS, jnp.bfloat16)
    for name, batch, heads, kv_heads, d, slots, slot in shapes:
        if args.shapes and not interpret and name not in args.shapes:
            continue
        ops = operands(batch, heads, kv_heads, d, slots, slot, layers, dtype)
        out, (kr, vr) = cached_attention_xla(*ops[:3], tuple(ops[3:5]), ops[5], 1, ops[6])
        ref = (out, kr, vr)
        got = da.decode_attention(*ops[:5], 1, *ops[5:], interpret=interpret)
        err = float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - ref[0].astype(jnp.float32))))
        cache_err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                        for a, b in zip(got[1:], ref[1:]))
        default = da.default_config(batch, kv_heads, slots)
        variants = [("xla", False, {}), ("kernel", True, dict(interpret=interpret))]
        variants += [(f"kernel-splits{s}", True, dict(splits=s, interpret=interpret)) for s in args.splits
                     if s != default["splits"] and slots % (default["block_k"] * s) == 0]
        for variant, kernel, config in variants:
            fn = step_fn(kernel, layers, **config)
            q, kc, vc = ops[0], ops[3] + 0, ops[4] + 0
            q, kc, vc = fn(q, *ops[1:3], kc, vc, *ops[5:])
            jax.block_until_ready(q)
            times = []
            for _ in range(3 if interpret else 20):
                t0 = time.perf_counter()
                q, kc, vc = fn(q, *ops[1:3], kc, vc, *ops[5:])
                jax.block_until_ready(q)
                times.append(time.perf_counter() - t0)
            print(json.dumps(dict(bench="decode-attention", shape=name, batch=batch, heads=heads, kv_heads=kv_heads,
                                  head_dim=d, slots=slots, variant=variant, **(config if kernel else {}),
                                  default=default, us_per_layer=round(float(np.median(times)) / layers * 1e6, 2),
                                  max_abs_diff=err, cache_max_abs_diff=cache_err, device=jax.devices()[0].device_kind)),
                  flush=True)


if __name__ == "__main__":
    main()
