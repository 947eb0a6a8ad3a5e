"""The LoRA skinny-product kernels (jaxvlm.kernels.lora_matmul: `narrow`, `tall`) against XLA's dots, on the GPU.

    PYTHONPATH=. python -m scripts.bench_lora_kernels              # the Qwen2-VL-2B step's shapes, r=16
    PYTHONPATH=. python -m scripts.bench_lora_kernels --cpu-check  # tiny shapes, the kernels in interpret mode

Shapes: the adapter products of a Qwen2-VL-2B training step at batch 8 (4,112 text tokens, 8,192 vision patches;
widths 1536/256/8960 text, 1280/3840/5120 vision). narrow: x [M, K] @ A[r, K]^T (the adapter's input product, and
g B in the backward); tall: u [M, P]^T @ v [M, r] (dA, dB). Each timed inside one jit as a fori_loop of 20 products,
each chaining its output into x's first element so that none is hoisted; `us` the median of 15 loops per product,
`gbps` the wide operand's bytes per second. One JSON line per (product, shape, variant).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels import lora_matmul as lk

NARROW = [(4112, 1536), (4112, 8960), (8192, 1280), (8192, 5120)]
QUICK = dict(narrow=[(4112, 1536), (8192, 5120)], tall=[(4112, 8960), (8192, 1280)])
TALL = [(4112, 1536), (4112, 8960), (4112, 256), (8192, 1280), (8192, 3840), (8192, 5120)]
LOOP = 20


def xla_narrow(x, a):
    return jax.lax.dot_general(x, a, (((1,), (1,)), ((), ())))


def xla_tall(u, v):
    return jax.lax.dot_general(u, v, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def time_loop(product, x, other, runs=15):
    @jax.jit
    def run(x, other):
        def body(_, x):
            y = product(x, other)
            return x.at[0, 0].add((y[0, 0] * 0).astype(x.dtype))
        return jax.lax.fori_loop(0, LOOP, body, x)
    jax.block_until_ready(run(x, other))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, other))
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times)) / LOOP


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="two shapes of each product")
    args = ap.parse_args(argv)
    interpret = args.cpu_check
    narrow_shapes, tall_shapes = ([(200, 64)], [(200, 64)]) if interpret else (NARROW, TALL)
    if args.quick:
        narrow_shapes, tall_shapes = QUICK["narrow"], QUICK["tall"]
    dtype = jnp.float32 if interpret else jnp.bfloat16
    r = args.rank
    device = jax.devices()[0].device_kind
    for m, k in narrow_shapes:
        x = jax.random.normal(jax.random.key(0), (m, k), dtype)
        a = jax.random.normal(jax.random.key(1), (r, k), dtype)
        ref = xla_narrow(x, a).astype(jnp.float32)
        variants = [("xla", {}, xla_narrow), ("kernel", {}, lambda x, a: lk.narrow(x, a, interpret=interpret))]
        for bm, bk, sp, nw in itertools.product((32, 64, 128), (128, 256), (1, 2, 4), (4, 8)):
            if k % (bk * sp) or (sp > 1 and (k // (bk * sp)) < 1):
                continue
            cfg = dict(block_m=bm, block_k=bk, splits=sp, num_warps=nw)
            variants.append(("kernel", cfg, lambda x, a, cfg=cfg: lk.narrow(x, a, interpret=interpret, **cfg)))
        for name, cfg, fn in variants[:3] if interpret else variants:
            err = float(jnp.linalg.norm(fn(x, a).astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            us = time_loop(fn, x, a, runs=1 if interpret else 15)
            print(json.dumps(dict(bench="lora-kernels", product="narrow", m=m, k=k, r=r, variant=name, **cfg,
                                  us=round(us, 2), gbps=round(m * k * x.dtype.itemsize / us / 1e3, 1),
                                  rel_err=err, device=device)), flush=True)
    for m, p in tall_shapes:
        u = jax.random.normal(jax.random.key(2), (m, p), dtype)
        v = jax.random.normal(jax.random.key(3), (m, r), dtype)
        ref = xla_tall(u, v)
        variants = [("xla", {}, xla_tall), ("kernel", {}, lambda u, v: lk.tall(u, v, interpret=interpret))]
        for bm, bp, sp, nw in itertools.product((64, 128, 256), (64, 128), (1, 2, 4), (4, 8)):
            if p % bp:
                continue
            m_blocks = -(-m // bm)
            splits = max(1, min(m_blocks, sp * -(-2 * lk._SMS // (p // bp))))
            cfg = dict(block_m=bm, block_p=bp, splits=splits, num_warps=nw)
            variants.append(("kernel", cfg, lambda u, v, cfg=cfg: lk.tall(u, v, interpret=interpret, **cfg)))
        for name, cfg, fn in variants[:3] if interpret else variants:
            err = float(jnp.linalg.norm(fn(u, v) - ref) / jnp.linalg.norm(ref))
            us = time_loop(fn, u, v, runs=1 if interpret else 15)
            print(json.dumps(dict(bench="lora-kernels", product="tall", m=m, p=p, r=r, variant=name, **cfg,
                                  us=round(us, 2), gbps=round(m * p * u.dtype.itemsize / us / 1e3, 1),
                                  rel_err=err, device=device)), flush=True)


if __name__ == "__main__":
    main()
