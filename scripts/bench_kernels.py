"""The Pallas NF4 decode kernel (jaxvlm.kernels.nf4_matmul) against XLA's two paths, on the GPU.

    PYTHONPATH=. python -m scripts.bench_kernels                # the sweep below, a few minutes on an H200
    PYTHONPATH=. python -m scripts.bench_kernels --cpu-check    # tiny shapes, the kernel in interpret mode

For the Linear shapes of the Qwen2-VL-2B and -7B language models (q/o, k/v, gate/up, down) and 1 or 8 rows of x
(a decode step at batch 1 or 8), the weight double-quantized NF4 of bf16 values and stacked over 4 layers as
the decoder's scan holds it, the product on layer 2:
  xla_dot   XLA's reference: dequantize layer 2 to bf16, then a dot;
  xla_rows  today's batch-1 decode path (layers.linear's rows product): sum(x_f32[..., None, :] * W_f32, -1),
            the dequantization fused into the reduction;
  kernel    the Pallas kernel reading layer 2 in place, over a small sweep of (block_n, block_k, split_k,
            num_warps) around its default.
Each is timed inside one jit as a fori_loop of 20 products, each chaining its output into x's first column (so
no product is hoisted; for the XLA paths layer 2's codes are xor'ed with an opaque zero drawn from x, fused into
their dequantization, so that is not hoisted either): `us` is the median over 15 runs of a loop, per product.
`gbps`: the bytes a product must read (codes, absmax codes and nested statistics, bf16 x) per second. `rel_err`:
||y - y_xla_dot|| / ||y_xla_dot|| of the bf16 outputs. One JSON line per (model, weight, rows, variant); at the
end the best kernel config per shape and its speedup over xla_rows and xla_dot.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.kernels import nf4_matmul as nk
from jaxvlm.quant import NF4, quantize_nf4

# model: {weight: (N, K)}
SHAPES = {
    "qwen2-vl-2b": {"q_proj/o_proj": (1536, 1536), "k_proj/v_proj": (256, 1536), "gate_proj/up_proj": (8960, 1536),
                    "down_proj": (1536, 8960)},
    "qwen2-vl-7b": {"q_proj/o_proj": (3584, 3584), "k_proj/v_proj": (512, 3584), "gate_proj/up_proj": (18944, 3584),
                    "down_proj": (3584, 18944)},
}
CPU_SHAPES = {"tiny": {"q": (64, 128), "kv": (32, 1536), "down": (96, 1024)}}  # K split 1, 12 and up to 8
LAYERS, LAYER, LOOP = 4, 2, 20


def median_us(fn, *args, n=200):
    """The median wall time of `fn(*args)` over n calls after a warm-up, in microseconds."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times))


def _opaque_zero(x: jax.Array) -> jax.Array:
    """0 as uint8, computed from x so that nothing depending on it is loop invariant (1 only for a NaN)."""
    return (x[0, 0] != x[0, 0]).astype(jnp.uint8)


def _layer(ws: NF4, zero: jax.Array) -> NF4:
    """Layer LAYER of the stack, its codes xor'ed with `zero` (a no-op XLA cannot see through)."""
    w = jax.tree.map(lambda a: a[LAYER], ws)
    return NF4(codes=w.codes ^ zero, absmax=w.absmax, nested_absmax=w.nested_absmax, nested_table=w.nested_table,
               offset=w.offset, shape=w.shape, dtype=w.dtype, blocksize=w.blocksize)


def xla_dot(x, ws, zero):
    return nk.nf4_matmul_reference(x, _layer(ws, zero))


def xla_rows(x, ws, zero):
    w = _layer(ws, zero).dequantize(jnp.float32)
    return jnp.sum(x.astype(jnp.float32)[..., None, :] * w, axis=-1).astype(x.dtype)


def kernel(config, interpret=False):
    return lambda x, ws, zero: nk.nf4_matmul(x, ws, LAYER, interpret=interpret, **config)


def looped(product, n_loop):
    """jit(x, ws -> (x_last, y_last)): n_loop products, each writing its output's first column into x's first
    column; x_last the input of the last one and y_last its output (for the error, without a second compile)."""
    def run(x, ws):
        def body(_, carry):
            x, _, _ = carry
            y = product(x, ws, _opaque_zero(x))
            return x.at[:, 0].set(y[:, 0]), x, y
        y0 = jnp.zeros((x.shape[0], ws.shape[0]), x.dtype)
        return jax.lax.fori_loop(0, n_loop, body, (x, x, y0))[1:]
    return jax.jit(run)


def configs(rows: int, n: int, k: int, limit: int) -> list[dict]:
    """The default config first, then `default_config`'s tilings of 32/64/16 outputs with K split for ~2, 1 or 4
    programs per SM, 4 or 8 warps (8 only for tiles of 4096 bytes or more); at most `limit`."""
    found = [nk.default_config(rows, n, k)]
    for block_n in (32, 64, 16):
        if n % block_n:
            continue
        for per_sm in (2, 1, 4):
            for num_warps in (4, 8):
                c = nk.default_config(rows, n, k, block_n, per_sm, num_warps)
                if num_warps == 8 and block_n * c["block_k"] * 32 < 4096:
                    continue
                if c not in found:
                    found.append(c)
    return found[:limit]


def read_bytes(rows: int, n: int, k: int) -> int:
    """What one product must read: the codes, the absmax codes, the nested absmax and table, bf16 x."""
    blocks = n * k // 64
    return n * k // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 2 * rows * k


def rel_err(y, ref) -> float:
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def time_loop(fn, x, ws, n_loop, runs) -> tuple[float, tuple]:
    """(us per product: the median over `runs` calls of the jitted loop over its length, the loop's output)."""
    out = jax.block_until_ready(fn(x, ws))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, ws))
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times)) / n_loop, out


def stacked_weight(key, n: int, k: int) -> NF4:
    """LAYERS distinct NF4 weights [n, k] of bf16 N(0, 0.02) values, leaves stacked on a leading axis."""
    ws = [quantize_nf4(0.02 * jax.random.normal(kl, (n, k), jnp.bfloat16)) for kl in jax.random.split(key, LAYERS)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ws)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-check", action="store_true", help="tiny shapes, the kernel in interpret mode")
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--max-configs", type=int, default=8, help="kernel configs per (shape, rows)")
    args = parser.parse_args(argv)
    interpret = args.cpu_check
    shapes = CPU_SHAPES if interpret else {m: SHAPES[m] for m in args.models.split(",")}
    n_loop, runs = (2, 1) if interpret else (LOOP, 15)
    device = jax.devices()[0].device_kind
    best = []
    key = jax.random.key(0)
    t_start = time.perf_counter()
    for model, weights in shapes.items():
        for name, (n, k) in weights.items():
            key, kw, kx = jax.random.split(key, 3)
            ws = stacked_weight(kw, n, k)
            for rows in map(int, args.rows.split(",")):
                x = jax.random.normal(kx, (rows, k), jnp.bfloat16)
                base = dict(bench="nf4_matmul", model=model, weight=name, n=n, k=k, rows=rows, device=device)
                ref = jax.jit(xla_dot)
                results, failed = {}, []
                variants = [("xla_dot", None, xla_dot), ("xla_rows", None, xla_rows)]
                variants += [("kernel", c, kernel(c, interpret)) for c in configs(rows, n, k, args.max_configs)]
                for variant, config, product in variants:
                    line = dict(base, variant=variant, **({"config": config} if config else {}))
                    try:
                        us, (x_last, y_last) = time_loop(looped(product, n_loop), x, ws, n_loop, runs)
                        line["rel_err"] = rel_err(y_last, ref(x_last, ws, jnp.uint8(0)))
                        line["us"] = round(us, 2)
                        line["gbps"] = round(read_bytes(rows, n, k) / us / 1e3, 1)
                        results.setdefault(variant, []).append((us, config))
                    except Exception as e:  # a lowering or compile failure is a result too
                        line["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                    print(json.dumps(line), flush=True)
                    if "error" in line or line["rel_err"] > 1e-2:
                        failed.append(line)
                if "kernel" in results:
                    us, config = min(results["kernel"], key=lambda r: r[0])
                    speedup = {f"vs_{v}": round(results[v][0][0] / us, 2) for v in ("xla_rows", "xla_dot") if v in results}
                    best.append(dict(base, variant="best_kernel", config=config, us=round(us, 2), **speedup))
                if interpret and failed:  # the check: every variant runs and agrees with the reference
                    raise SystemExit(f"--cpu-check failed: {failed}")
    for line in best:
        print(json.dumps(line), flush=True)
    print(json.dumps(dict(bench="nf4_matmul", total_s=round(time.perf_counter() - t_start, 1))), flush=True)


if __name__ == "__main__":
    main()
