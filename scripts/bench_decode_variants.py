"""Decode tokens/s of the Qwen2-VL-2B geometry under variants of the decode program (an experiment of issue 19).

    PYTHONPATH=. python -m scripts.bench_decode_variants --variants base dot scan --weights 16bit nf4

Variants: base (today's program), dot (JAXVLM_ROWS_PRODUCT=off: decode products as dots), nosib
(JAXVLM_SIBLING_PRODUCTS=off: q/k/v each its own one-row product), scan (the decode step's
layers as a scan, not unrolled), dsfusion (XLA's --xla_gpu_enable_dynamic_slice_fusion), nf4kernel
(JAXVLM_NF4_KERNEL=on), xlaattn (JAXVLM_DECODE_ATTENTION=off: the cache writes and attention by XLA), cublas
(--xla_gpu_enable_triton_gemm=false; not yet run), combinations joined by "+". Each
variant and weights kind in its own process: one JSON line with bench_generate's speeds and the GPU time per new
token by kernel kind (bench_train's CUPTI summary).

The NF4 one-row variants of 2026-11-30 (nf4select, nf4blocksum, nf4blockselect: JAXVLM_NF4_ROWS) lost to the table
lookup and were removed; their numbers are in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


# What a variant sets in its process's environment (scan is set inside it, base is today's program).
ENV = {"dot": ("JAXVLM_ROWS_PRODUCT", "off"), "nosib": ("JAXVLM_SIBLING_PRODUCTS", "off"),
       "nf4kernel": ("JAXVLM_NF4_KERNEL", "on"),
       "xlaattn": ("JAXVLM_DECODE_ATTENTION", "off"),
       "dsfusion": ("XLA_FLAGS", "--xla_gpu_enable_dynamic_slice_fusion=true"),
       # dots as cuBLAS calls: with dsfusion a slice of a stacked weight may be read in place (XLA's dynamic-slice
       # fusion takes library calls, not Triton GEMMs)
       "cublas": ("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")}


def one(variant: str, weights: str, batch: int, new: int, geometry: str, tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from scripts.bench_common import load_geometry, random_model, workload_image
    from scripts.bench_generate import bench_jaxvlm, generate_call
    if "scan" in variant.split("+"):  # the decode step's layers as a scan (generate unrolls them)
        import contextlib

        import jaxvlm.generate
        jaxvlm.generate.unrolled_layers = contextlib.nullcontext
    model_cls, cfg = load_geometry(geometry, tiny)
    model = random_model(cfg, jnp.bfloat16, nf4=weights == "nf4", model_cls=model_cls)
    image = workload_image(cfg, tiny)
    line = bench_jaxvlm(model, cfg, batch, new, image)
    if jax.default_backend() == "gpu":
        from scripts.bench_train import torch_cupti_trace
        s = torch_cupti_trace(generate_call(model, cfg, batch, new, image), new)
        line.update(gpu_ms_per_token=s["gpu_kernel_ms_per_step"], busy_ms_per_token=s["busy_ms_per_step"],
                    by_kind_ms=s["by_kind_ms"], kernels_per_token=sum(r[2] for r in s["top_kernels_ms"]),
                    top=s["top_kernels_ms"][:8])
    return dict(bench="decode-variant", variant=variant, weights=weights, geometry=geometry, **line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["base", "dot", "scan"])
    ap.add_argument("--weights", nargs="+", default=["16bit"], choices=["16bit", "nf4"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--geometry", default="qwen2-vl-2b")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        variant, weights = args.one.split(":")
        print(json.dumps(one(variant, weights, args.batch, args.new, args.geometry, args.tiny)), flush=True)
        return
    for weights in args.weights:
        for variant in args.variants:
            env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
            for part in variant.split("+"):
                name, value = ENV.get(part, (None, None))
                if name == "XLA_FLAGS":
                    env[name] = f"{env.get(name, '')} {value}".strip()
                elif name:
                    env[name] = value
            r = subprocess.run([sys.executable, "-m", "scripts.bench_decode_variants", "--one", f"{variant}:{weights}",
                                "--batch", str(args.batch), "--new", str(args.new), "--geometry", args.geometry,
                                *(["--tiny"] if args.tiny else [])], env=env)
            if r.returncode:
                print(json.dumps(dict(bench="decode-variant", variant=variant, weights=weights,
                                      error=f"exit {r.returncode}")), flush=True)


if __name__ == "__main__":
    main()
