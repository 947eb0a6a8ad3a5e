"""Decode speed of a geometry of bench_common (random weights): jaxvlm vs transformers' generate, same GPU.

On the lent GPU machine:

    PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python scripts/bench_generate.py --geometry qwen3-vl-2b \
        --batch 1 --new 128 --quant 16bit nf4 --hf

Each prompt: one 448x448 image (bench_common.image_tokens: 256 merged tokens for Qwen2-VL, 196 for Qwen3-VL; Gemma 3:
one 896x896 image, 256 tokens in "\\n\\n<boi>" .. "<eoi>\\n\\n", with token_type_ids) + 32 text tokens. Generation
runs exactly --new tokens (no EOS), greedy. Each implementation/weights runs in its own
process (its own peak-memory reading); one JSON line per batch size: generate seconds for the whole call (prefill +
--new tokens) and for a call generating one token (the prefill), each the median of 3 after a warm-up; new
tokens/s of the whole call, decode tokens/s = batch x (new - 1) / (generate - prefill), peak device memory.
jaxvlm runs in bf16 ("16bit") or with its Linear weights (and experts) in NF4 ("nf4"); transformers (--hf) in
bf16, its model built on the GPU from the config. With --trace DIR, after the measurements, the first weights kind's
first batch generates once more under a profiler (CUPTI through torch's profiler, as bench_train --trace): GPU time
per new token by kernel kind and kernel (XLA's fusions named from the optimized HLO), and the share of the call the
GPU was busy (DIR/summary.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from scripts.bench_common import (GEOMETRIES, hf_geometry, hf_inputs, load_geometry, random_model, raw_batch,
                                  workload_image)

TEXT = 32


def timed(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def speeds(generate_s: float, prefill_s: float, batch: int, new: int) -> dict:
    decode_s = generate_s - prefill_s  # None below: the two medians too close to tell (tiny models)
    return dict(generate_s=round(generate_s, 4), prefill_s=round(prefill_s, 4),
                new_tokens_per_s=round(batch * new / generate_s, 1),
                decode_tokens_per_s=round(batch * (new - 1) / decode_s, 1) if decode_s > 0.01 * generate_s else None)


def generate_call(model, cfg, batch: int, new: int, image: int, mesh=None):
    """A call of jaxvlm's generate on the workload (see the module docstring): exactly `new` tokens, greedy."""
    from jaxvlm.generate import generate
    raw = raw_batch(cfg, batch, TEXT, image)
    return lambda: generate(model, **raw, max_new_tokens=new, eos_token_id=-1, pad_token_id=0, mesh=mesh)


def bench_jaxvlm(model, cfg, batch: int, new: int, image: int, mesh=None) -> dict:
    import jax

    def run(n):
        return generate_call(model, cfg, batch, n, image, mesh)
    out = run(new)()
    prompt_tokens = raw_batch(cfg, 1, TEXT, image)["input_ids"].shape[1]
    assert out.shape == (batch, prompt_tokens + new), out.shape
    generate_s, prefill_s = timed(run(new)), timed(run(1))
    # With a mesh: the largest peak of its devices.
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in (mesh.devices.flat if mesh else
                                                                              jax.devices()[:1]))
    return dict(impl="jaxvlm", batch=batch, prompt_tokens=prompt_tokens, new_tokens=new,
                **speeds(generate_s, prefill_s, batch, new), peak_gib=round(peak / 2**30, 2),
                device=jax.devices()[0].device_kind,
                **({"mesh": dict(mesh.shape), "devices": mesh.size} if mesh is not None else {}))


def trace_generate(model, cfg, batch: int, new: int, image: int, mesh, out_dir: str, geometry: str, weights: str):
    """One profiled generate call (after a warm-up): bench_train's kernel summary, per new token."""
    import jax

    from scripts.bench_train import keep_hlo_dump, name_kernels, torch_cupti_trace
    run = generate_call(model, cfg, batch, new, image, mesh)
    run()
    t0 = time.perf_counter()
    run()
    wall_ms = (time.perf_counter() - t0) * 1e3
    os.makedirs(out_dir, exist_ok=True)
    summary = torch_cupti_trace(run, new, os.path.join(out_dir, "timeline.json.gz"))
    hlo = {name: text for name in ("prefill", "decode_loop")
           if (text := keep_hlo_dump(os.environ.get("JAXVLM_BENCH_DUMP", ""), out_dir, name))}
    if hlo:
        summary["top_kernels_ms"] = name_kernels(summary["top_kernels_ms"], hlo)
    # Per new token: wall of an unprofiled call, GPU kernel time and the GPU's busy time (the prefill included).
    out = dict(bench="generate-trace", geometry=geometry, weights=weights, batch=batch, new_tokens=new,
               wall_ms_per_token=round(wall_ms / new, 3), device=jax.devices()[0].device_kind, **summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "top_kernels_ms"}), flush=True)


def bench_hf(geometry: str, batches: list[int], new: int, tiny: bool):
    """Yields one result per batch size, the transformers model built once (bf16, sdpa)."""
    import torch
    from transformers import AutoModelForImageTextToText
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    _, cfg = load_geometry(geometry, tiny)
    image = workload_image(cfg, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(hf_geometry(geometry, tiny), dtype=torch.bfloat16,
                                                        attn_implementation="sdpa").eval()
    for batch in batches:
        # Qwen-VL: image_grid_thw and mm_token_type_ids beside the ids and pixels; Gemma 3: token_type_ids.
        kw = hf_inputs(cfg, raw_batch(cfg, batch, TEXT, image), device)
        ids = kw["input_ids"]

        def run(n):
            def call():
                with torch.no_grad():
                    out = model.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                sync()
                return out
            return call
        assert run(new)().shape == (batch, ids.shape[1] + new)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        generate_s, prefill_s = timed(run(new)), timed(run(1))
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        yield dict(impl="transformers", weights="16bit", batch=batch, prompt_tokens=ids.shape[1], new_tokens=new,
                   **speeds(generate_s, prefill_s, batch, new), peak_gib=round(peak, 2),
                   device=torch.cuda.get_device_name() if device == "cuda" else "cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="qwen2-vl-2b", choices=sorted(GEOMETRIES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--quant", nargs="+", default=["16bit"], choices=["16bit", "nf4"])
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate (needs torch+cuda)")
    ap.add_argument("--dir", help="load this checkpoint (scripts/bench_load.py writes one) instead of random "
                                  "weights, so that the NF4 run's peak memory never holds a 16-bit copy")
    ap.add_argument("--mesh", help="generate on a device mesh (jaxvlm.sharding), e.g. tensor=2: weights drawn "
                                   "straight into their shards, peak_gib the largest of the devices'")
    ap.add_argument("--trace", help="profile one generate call of the first weights kind and batch into this directory")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # (internal) run one implementation/weights in this process
    # the family's tiny config, 64-pixel images (Gemma 3: the tiny tower's 28)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    common = ["--geometry", args.geometry, "--new", str(args.new), "--batch", *map(str, args.batch),
              *(["--dir", args.dir] if args.dir else []), *(["--tiny"] if args.tiny else []),
              *(["--mesh", args.mesh] if args.mesh else [])]
    if args.one is None:
        # One process per configuration, so that each peak-memory reading is its own.
        for one in [*args.quant, *(["hf"] if args.hf else [])]:
            # transformers' process keeps JAX (imported with bench_common) off the GPU that torch measures.
            env = dict(os.environ, **({"JAX_PLATFORMS": "cpu"} if one == "hf" else {}))
            r = subprocess.run([sys.executable, "-m", "scripts.bench_generate", "--one", one, *common], env=env)
            if r.returncode:
                print(json.dumps(dict(bench="generate", geometry=args.geometry, weights=one, batch=args.batch,
                                      error=f"exit {r.returncode}")), flush=True)
        if args.trace:  # in its own process, after the measurements (the profiler has crashed lent GPUs' processes)
            dump = tempfile.mkdtemp(prefix="xla_dump_")
            env = dict(os.environ, JAXVLM_BENCH_DUMP=dump,
                       XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text")
            common[common.index("--batch") + 1:common.index("--batch") + 1 + len(args.batch)] = [str(args.batch[0])]
            subprocess.run([sys.executable, "-m", "scripts.bench_generate", "--one", args.quant[0], "--trace",
                            args.trace, *common], env=env)
        return
    if args.one == "hf":
        for line in bench_hf(args.geometry, args.batch, args.new, args.tiny):
            print(json.dumps(dict(bench="generate", geometry=args.geometry, **line)), flush=True)
        return
    import jax.numpy as jnp

    from jaxvlm.sharding import make_mesh
    mesh = make_mesh(args.mesh) if args.mesh else None
    if args.dir:
        from jaxvlm import FastVisionModel
        model, _ = FastVisionModel.from_pretrained(args.dir, load_in_4bit=args.one == "nf4", mesh=mesh)
        cfg = model.config
    else:
        model_cls, cfg = load_geometry(args.geometry, args.tiny)
        model = random_model(cfg, jnp.bfloat16, nf4=args.one == "nf4", model_cls=model_cls, mesh=mesh)
    image = workload_image(cfg, args.tiny)
    if args.trace:
        trace_generate(model, cfg, args.batch[0], args.new, image, mesh, args.trace, args.geometry, args.one)
        return
    for b in args.batch:
        line = bench_jaxvlm(model, cfg, b, args.new, image, mesh)
        print(json.dumps(dict(bench="generate", geometry=args.geometry, weights=args.one, **line)), flush=True)


if __name__ == "__main__":
    main()
