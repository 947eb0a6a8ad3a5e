"""The Pallas NF4 decode kernel against XLA's dequantize-then-multiply, on the GPU.

    python -m scripts.bench_kernels

For the Linear shapes of the Qwen2-VL-2B language model and 1 or 8 rows (a decode step at batch 1
or 8): the relative error against the XLA path and the median time of each, over 200 calls.
One JSON line per shape and block size.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference
from jaxvlm.quant import quantize_nf4

SHAPES = {"q_proj/o_proj": (1536, 1536), "k_proj/v_proj": (256, 1536), "gate_proj/up_proj": (8960, 1536),
          "down_proj": (1536, 8960)}


def median_us(fn, *args, n=200):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    ref = jax.jit(nf4_matmul_reference)
    for name, (n, k) in SHAPES.items():
        w = quantize_nf4(jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.bfloat16))
        for rows in (1, 8):
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
            expect = np.asarray(ref(x, w), np.float32)
            t_ref = median_us(ref, x, w)
            for block_n in (16, 32, 64):
                line = dict(bench="nf4_matmul", weight=name, n=n, k=k, rows=rows, block_n=block_n,
                            device=jax.devices()[0].device_kind, xla_us=round(t_ref, 1))
                try:
                    fn = jax.jit(lambda x, w, b=block_n: nf4_matmul(x, w, block_n=b))
                    got = np.asarray(fn(x, w), np.float32)
                    line["rel_err"] = float(np.linalg.norm(got - expect) / np.linalg.norm(expect))
                    line["pallas_us"] = round(median_us(fn, x, w), 1)
                    line["speedup"] = round(t_ref / line["pallas_us"], 2)
                except Exception as e:  # a lowering failure is a result too
                    line["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
