"""Gemma 3's attention alone: the Pallas kernel (jaxvlm.kernels.flash_attention.block_attention) against cuDNN with the
dense [batch, 1, seq, seq] mask and XLA's reference, forward and forward + backward, on the GPU. One JSON line each.

    PYTHONPATH=. python scripts/bench_attention.py                      # 8,192 tokens, Gemma-3-4B's heads (8 / 4 x 256)
    PYTHONPATH=. python scripts/bench_attention.py --seq 4096 --heads 32 16 --head-dim 128 --window 1024

Inputs: one row (`--batch`), bf16, an image run of 256 tokens at position 16 (bidirectional among themselves), the
rest text, no padding; `--window` makes it a sliding layer. Times: median of 20 calls after 3 warm-ups.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels import flash_attention as fa


def timed(f, *args, n=20):
    jax.block_until_ready(f(*args))
    for _ in range(2):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, nargs=2, default=[8, 4], help="query heads, kv heads")
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--impl", nargs="+", default=["pallas", "cudnn", "xla"])
    args = ap.parse_args(argv)
    b, t, (h, kh), d = args.batch, args.seq, args.heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, kh, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, kh, d), jnp.bfloat16)
    g = jax.random.normal(keys[3], (b, t, h, d), jnp.bfloat16)
    key_ok = jnp.ones((b, t), jnp.int32)
    blocks = jnp.full((b, t), -1, jnp.int32).at[:, 16:272].set(0)
    scale = d ** -0.5

    def attend(impl):
        if impl == "pallas":
            return lambda q, k, v: fa.block_attention(q, k, v, key_ok, blocks, window=args.window, scale=scale)
        mask = fa.dense_mask(key_ok, blocks, args.window)
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)

    for impl in args.impl:
        f = attend(impl)
        fwd = jax.jit(f)
        bwd = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](g))
        try:
            row = dict(forward_ms=round(1e3 * timed(fwd, q, k, v), 3),
                       forward_backward_ms=round(1e3 * timed(bwd, q, k, v), 3))
        except Exception as e:  # e.g. cuDNN refusing a shape: say so, go on
            row = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        print(json.dumps(dict(bench="attention", impl=impl, batch=b, seq=t, heads=h, kv_heads=kh, head_dim=d,
                              window=args.window, device=jax.devices()[0].device_kind, **row)), flush=True)


if __name__ == "__main__":
    main()
