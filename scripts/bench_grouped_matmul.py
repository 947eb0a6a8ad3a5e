"""The Mosaic GPU grouped matmul (jaxvlm.kernels.grouped_matmul) against XLA's ragged_dot_general, on a Hopper GPU.

    python -m scripts.bench_grouped_matmul

Qwen3-VL-30B-A3B's expert products (128 experts; gate_up 2048 -> 1536, down 768 -> 2048) for the (token,
expert) pairs of a batch of 4 and 8 samples of 454 tokens with top-8 routing (random, so groups are uneven):
relative error of the product and of the input gradient, and the median time of each path (product alone,
product + input gradient). One JSON line per shape and batch.
"""
from __future__ import annotations

import json
import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels import grouped_matmul as gm
from scripts.bench_kernels import median_us

SHAPES = {"gate_up_proj": (1536, 2048), "down_proj": (2048, 768)}
EXPERTS, TOP_K, SEQ = 128, 8, 454


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    rng = np.random.default_rng(0)
    for batch in (4, 8):
        m = batch * SEQ * TOP_K
        sizes = jnp.asarray(np.bincount(rng.integers(0, EXPERTS, m), minlength=EXPERTS), jnp.int32)
        for name, (out, inp) in SHAPES.items():
            x = jnp.asarray(rng.standard_normal((m, inp)), jnp.bfloat16)
            w = jnp.asarray(rng.standard_normal((EXPERTS, out, inp)) * 0.02, jnp.bfloat16)
            g = jnp.asarray(rng.standard_normal((m, out)), jnp.bfloat16)
            line = dict(bench="grouped_matmul", weight=name, rows=m, out=out, inp=inp, experts=EXPERTS,
                        device=jax.devices()[0].device_kind)
            paths = {"xla": gm.xla_grouped_matmul, "mgpu": gm.with_kernel(gm._mgpu_kernel)}
            results = {}
            for label, f in paths.items():
                try:
                    fwd = jax.jit(f)
                    both = jax.jit(lambda x, w, s, f=f: jax.vjp(lambda x_: f(x_, w, s), x)[1](g)[0])
                    results[label] = (fwd(x, w, sizes), both(x, w, sizes))
                    line[f"{label}_ms"] = round(median_us(fwd, x, w, sizes, n=20) / 1e3, 3)
                    line[f"{label}_with_dx_ms"] = round(median_us(both, x, w, sizes, n=20) / 1e3, 3)
                except Exception as e:  # a lowering failure is a result too
                    line[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
            if len(results) == 2:
                line["rel_err_out"] = rel(results["mgpu"][0], results["xla"][0])
                line["rel_err_dx"] = rel(results["mgpu"][1], results["xla"][1])
                line["speedup"] = round(line["xla_ms"] / line["mgpu_ms"], 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
