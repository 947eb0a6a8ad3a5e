"""EXPERIMENT (issue 19; removed in the next commit): bf16 one-row products by a Pallas Triton kernel against XLA's fused
reduction, 28 stacked weights read in place, a few configs per 2B shape: `python scripts/bench_gemv_pallas.py`."""
import functools, itertools, json, sys, time, os
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

INTERPRET = jax.default_backend() != "gpu"


def _kernel(x_ref, w_ref, o_ref, *, bk, steps, swiglu, n_half):
    s = pl.program_id(1)
    bn = w_ref.shape[-2] if not swiglu else w_ref.shape[-2]
    def body(i, acc):
        k0 = (s * steps + i) * bk
        x = x_ref[pl.ds(k0, bk)].astype(jnp.float32)
        w = w_ref[:, pl.ds(k0, bk)].astype(jnp.float32)
        return acc + w * x[None, :]
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((w_ref.shape[0], bk), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=1)


def gemv(x, w, layer, *, bn, bk, split, warps, stages=2):
    L, n, k = w.shape
    steps = k // (bk * split)
    assert steps * bk * split == k, (k, bk, split)
    out = pl.pallas_call(
        functools.partial(_kernel, bk=bk, steps=steps, swiglu=False, n_half=0),
        out_shape=jax.ShapeDtypeStruct((split, n), jnp.float32),
        grid=(n // bn, split),
        in_specs=[pl.BlockSpec((k,), lambda j, s: (0,)), pl.BlockSpec((None, bn, k), lambda j, s: (layer, j, 0))],
        out_specs=pl.BlockSpec((None, bn), lambda j, s: (s, j)),
        interpret=INTERPRET,
        **({} if INTERPRET else dict(compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages))),
    )(x, w)
    return jnp.sum(out, axis=0) if split > 1 else out[0]


def xla(x, w, layer):
    return jnp.sum(x.astype(jnp.float32)[None, :] * w[layer].astype(jnp.float32), axis=-1)


def timed(f, *a, reps=20):
    r = f(*a); jax.block_until_ready(r)
    t = time.perf_counter()
    for _ in range(reps):
        r = f(*a)
    jax.block_until_ready(r)
    return (time.perf_counter() - t) / reps


def main():
    L = int(os.environ.get("LAYERS", "28"))
    shapes = {"gateup": (17920, 1536), "down": (1536, 8960), "qo": (1536, 1536)}
    if INTERPRET:
        L = 2; shapes = {"t": (64, 512)}
    for name, (n, k) in shapes.items():
        w = jax.random.normal(jax.random.PRNGKey(0), (L, n, k), jnp.bfloat16)
        x = jax.random.normal(jax.random.PRNGKey(1), (L, k), jnp.bfloat16)
        ref = jax.jit(lambda x, w: jnp.stack([xla(x[l], w, l) for l in range(L)]))
        base = timed(ref, x, w)
        want = np.asarray(ref(x, w))
        print(json.dumps(dict(shape=name, impl="xla", us=round(base / L * 1e6, 2), tbps=round(n * k * 2 / (base / L) / 1e12, 2))), flush=True)
        bks = [128, 256, 512] if k % 512 == 0 else [128, 256] if k % 256 == 0 else [128]
        cfgs = {"gateup": [(8, 256, 1, 4), (16, 256, 1, 4), (16, 512, 1, 4), (32, 256, 1, 4), (32, 512, 1, 8),
                           (8, 512, 1, 4), (16, 128, 1, 4), (32, 128, 1, 8), (64, 256, 1, 8), (16, 256, 2, 4)],
                "down": [(8, 128, 5, 4), (8, 128, 7, 4), (16, 128, 5, 4), (16, 128, 10, 4), (8, 256, 5, 4),
                         (4, 128, 5, 4), (16, 128, 7, 8), (32, 128, 10, 8), (8, 128, 10, 4), (16, 256, 7, 4)],
                "qo": [(8, 128, 1, 4), (8, 256, 2, 4), (16, 128, 3, 4), (8, 128, 3, 4), (4, 256, 1, 4),
                       (16, 256, 2, 4), (8, 512, 1, 4)],
                "t": [(8, 128, 1, 4), (16, 128, 2, 4)]}[name]
        for bn, bk, split, warps in cfgs:
            try:
                f = jax.jit(lambda x, w: jnp.stack([gemv(x[l], w, l, bn=bn, bk=bk, split=split, warps=warps) for l in range(L)]))
                got = np.asarray(f(x, w))
                err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-6))
                t = timed(f, x, w)
                print(json.dumps(dict(shape=name, impl="pallas", bn=bn, bk=bk, split=split, warps=warps, us=round(t / L * 1e6, 2),
                                      tbps=round(n * k * 2 / (t / L) / 1e12, 2), err=err)), flush=True)
            except Exception as e:
                print(json.dumps(dict(shape=name, bn=bn, bk=bk, split=split, warps=warps, error=str(e)[:200])), flush=True)


if __name__ == "__main__":
    main()
