"""Many requests of mixed lengths: jaxvlm's engine (fast_generate's continuous batching) vs batched `generate`, jaxvlm's
and transformers', on the same requests and GPU (issue 19, `fast_inference`).

    PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python -m scripts.bench_engine --geometry qwen2-vl-2b \
        --requests 256 --slots 64 --impl engine generate hf

The requests (seeded): each one 448x448 image (256 tokens for Qwen2-VL) and a random number of text tokens in
[--text-min, --text-max], and its own number of new tokens in [--new-min, --new-max] (random weights give no natural
EOS, so a request ends at its own count, as one with an EOS would). Implementations, each in its own process:
  engine    jaxvlm.engine.Engine with --slots slots (a request admitted as soon as a slot frees), greedy;
  generate  jaxvlm's generate over groups of --slots requests in order, each group left-padded to its longest
            prompt and run to its largest new-token count (what a user without an engine does);
  hf        transformers' generate (bf16, sdpa), the same groups.
Counted: only each request's own new tokens (a group's extra tokens are waste). jaxvlm's two run the whole set once
untimed (compiling every program the timed run needs), transformers' one group, then the whole set, timed. One
JSON line per implementation: requests/s, new tokens/s, seconds, peak device memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from scripts.bench_common import GEOMETRIES, hf_geometry, hf_inputs, load_geometry, random_model, raw_batch, \
    workload_image


def workload(cfg, args, image: int):
    """[(processor-like outputs of one request, its new tokens)], seeded. Every family's `raw_batch` ends with its
    text tokens; a request's text is drawn from them (ids the family's tokenizer would give plain text)."""
    rng = np.random.default_rng(args.seed)
    texts = rng.integers(args.text_min, args.text_max + 1, args.requests)
    news = rng.integers(args.new_min, args.new_max + 1, args.requests)
    out = []
    for i, (t, n) in enumerate(zip(texts, news)):
        raw = raw_batch(cfg, 1, int(t), image)
        ids = raw["input_ids"].copy()
        ids[0, -int(t):] = np.random.default_rng(i).choice(ids[0, -int(t):], int(t))  # the image part stays
        out.append((dict(raw, input_ids=ids), int(n)))
    return out


def groups(requests, size: int, model_cls):
    """Batches of `size` requests in order, prompts left-padded with 0: the arrays that run along the tokens
    (`engine.token_axes`) padded on their token axis, the rest (pixels, image sizes and grids, tile ratios: per image)
    concatenated along their first axis."""
    from jaxvlm.engine import token_axes
    along = token_axes(model_cls)
    for start in range(0, len(requests), size):
        part = [r for r, _ in requests[start:start + size]]
        longest = max(r["input_ids"].shape[1] for r in part)
        batch = {}
        for key in part[0]:
            rows = [np.asarray(r[key]) for r in part]
            if key in along:
                for i, v in enumerate(rows):
                    widths = [(0, 0)] * v.ndim
                    widths[along[key]] = (longest - v.shape[along[key]], 0)
                    rows[i] = np.pad(v, widths)
            batch[key] = np.concatenate(rows)
        yield batch, [n for _, n in requests[start:start + size]]


def run_engine(model, requests, slots: int, steps: int):
    """The whole set twice on one engine: the first run compiles (every prompt bucket and prefill batch size the
    admissions meet; the second meets the same ones), the second is timed."""
    from jaxvlm.engine import Engine
    longest = max(r["input_ids"].shape[1] for r, _ in requests) + max(n for _, n in requests)
    length = -(-(longest + 64) // 64) * 64
    engine = Engine(model, max_num_seqs=slots, max_length=length, eos_token_id=-1, pad_token_id=0, steps=steps)
    for timed in (False, True):
        engine.stats.clear()
        t0 = time.perf_counter()
        out = [engine.submit(max_new_tokens=n, **r) for r, n in requests]
        engine.run()
        seconds = time.perf_counter() - t0
        assert all(len(o.token_ids) == n for o, (_, n) in zip(out, requests))
    return seconds, dict(max_length=length, steps_per_call=engine.steps, **engine.stats)


def run_generate(model, requests, slots: int):
    from jaxvlm.generate import generate
    batches = list(groups(requests, slots, type(model)))
    for batch, news in batches:  # warm-up: compiles each group's programs
        generate(model, **batch, max_new_tokens=max(news), eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    for batch, news in batches:
        out = generate(model, **batch, max_new_tokens=max(news), eos_token_id=-1, pad_token_id=0)
        assert out.shape[1] == batch["input_ids"].shape[1] + max(news)
    return time.perf_counter() - t0, {}


def run_hf(geometry: str, requests, slots: int, tiny: bool):
    import torch
    from transformers import AutoModelForImageTextToText
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_cls, cfg = load_geometry(geometry, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(hf_geometry(geometry, tiny), dtype=torch.bfloat16,
                                                        attn_implementation="sdpa").eval()

    def call(batch, news):
        kw = hf_inputs(cfg, batch, device)
        kw["attention_mask"] = torch.tensor(batch["attention_mask"], device=device)
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=max(news), min_new_tokens=max(news), do_sample=False,
                                 pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    batches = list(groups(requests, slots, model_cls))
    call(*batches[0])  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for batch, news in batches:
        assert call(batch, news).shape[1] == batch["input_ids"].shape[1] + max(news)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return seconds, dict(peak_gib=round(peak, 2), device=torch.cuda.get_device_name() if device == "cuda" else "cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="qwen2-vl-2b", choices=sorted(GEOMETRIES))
    ap.add_argument("--impl", nargs="+", default=["engine", "generate", "hf"], choices=["engine", "generate", "hf"])
    ap.add_argument("--weights", default="16bit", choices=["16bit", "nf4"], help="jaxvlm's weights (hf: bf16)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--slots", type=int, default=64, help="engine slots; the group size of the batched generates")
    ap.add_argument("--text-min", type=int, default=16)
    ap.add_argument("--text-max", type=int, default=256)
    ap.add_argument("--new-min", type=int, default=16)
    ap.add_argument("--new-max", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=8, help="engine: decode steps per call of its device program")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is None:
        for impl in args.impl:
            env = dict(os.environ, **({"JAX_PLATFORMS": "cpu"} if impl == "hf" else {}))
            argv = [a for a in sys.argv[1:] if a != "--impl" and a not in ("engine", "generate", "hf")]
            r = subprocess.run([sys.executable, "-m", "scripts.bench_engine", "--one", impl, *argv], env=env)
            if r.returncode:
                print(json.dumps(dict(bench="engine", impl=impl, error=f"exit {r.returncode}")), flush=True)
        return
    model_cls, cfg = load_geometry(args.geometry, args.tiny)
    image = workload_image(cfg, args.tiny)
    requests = workload(cfg, args, image)
    tokens = sum(n for _, n in requests)
    if args.one == "hf":
        seconds, extra = run_hf(args.geometry, requests, args.slots, args.tiny)
        impl, weights = "transformers", "16bit"
    else:
        import jax
        import jax.numpy as jnp
        model = random_model(cfg, jnp.bfloat16, nf4=args.weights == "nf4", model_cls=model_cls)
        seconds, extra = (run_engine(model, requests, args.slots, args.steps) if args.one == "engine" else
                          run_generate(model, requests, args.slots))
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
        extra.update(peak_gib=round(peak / 2**30, 2), device=jax.devices()[0].device_kind)
        impl, weights = f"jaxvlm-{args.one}", args.weights
    print(json.dumps(dict(bench="engine", impl=impl, weights=weights, geometry=args.geometry,
                          requests=args.requests, slots=args.slots, text_tokens=[args.text_min, args.text_max],
                          new_tokens=[args.new_min, args.new_max], total_new_tokens=tokens,
                          seconds=round(seconds, 3), requests_per_s=round(args.requests / seconds, 2),
                          new_tokens_per_s=round(tokens / seconds, 1), **extra)), flush=True)


if __name__ == "__main__":
    main()
