"""LoRA training step of a model geometry (random weights; Qwen2-VL-2B by default) through jaxvlm's SFTTrainer,
on the GPU. On the lent GPU machine:

    PYTHONPATH=. python -m scripts.bench_train --geometry qwen3-vl-2b --batch 4 8 --weights bf16 nf4 --remat full
    PYTHONPATH=. python -m scripts.bench_train --geometry gemma3-4b --batch 4 8 --weights bf16 nf4 --remat full
    python -m scripts.bench_train --batch 4 8 --weights bf16 nf4 --remat unsloth full
    python -m scripts.bench_train --batch 4 --attn xla auto --loss-chunk 0 512 --trace $OUT/trace

Workload (the benchmark issue's): each sample one 448x448 image (256 merged tokens with Qwen2-VL's 14-pixel
patches, 196 with Qwen3-VL's 16-pixel ones; Gemma 3: one 896x896 image, 256 pooled tokens wrapped in
"\\n\\n<boi>" .. "<eoi>\\n\\n", token_type_ids marking them; mllama, llava: bench_common's layouts) + `--text`
text tokens, LoRA r=16 on every Linear Unsloth's default regex picks (vision and language, attention and MLP; not
MoE experts, which are no Linear), AdamW, remat per block. Each configuration runs in its own process; one JSON
line each: median step seconds over 10 steps after 3 warm-ups, tokens/s, peak device GiB, model FLOP utilisation.
With --trace DIR the first configuration runs once more, in its own process after the measurements,
under a profiler (3 steps); its GPU time is summarised by kernel kind and kernel, with the GPU's busy
share (DIR/summary.json, and printed), and the step's optimized HLO is kept (DIR/step_hlo.txt.gz) to
name XLA's fusion kernels. --trace-tool jax uses jax.profiler (it crashed on the lent H100 of
2026-11-23); torch (default) reads the same CUPTI records through torch's profiler.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from scripts.bench_common import (GEOMETRIES, image_prefix, image_tokens, is_gemma3, is_llava, is_mllama,
                                  load_geometry, random_model, raw_batch, vision_tower, workload_image)

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM


def model_flops_per_step(cfg, batch: int, seq: int, patches: int) -> float:
    """6 x params x tokens for the matmuls of a full step (LoRA still back-propagates through the base),
    plus attention (12 x layers x tokens x seq x width; causal text attention counted in full), text
    and vision. A MoE layer counts the parameters a token uses (router and its experts)."""
    if is_gemma3(cfg):
        return _gemma3_flops_per_step(cfg, batch, seq, patches)
    if is_mllama(cfg):
        return _mllama_flops_per_step(cfg, batch, seq)
    if is_llava(cfg):
        return _llava_flops_per_step(cfg, batch, seq, patches)
    t, v = cfg.text, vision_tower(cfg)
    deepstack = len(getattr(cfg.vision, "deepstack_visual_indexes", ()))  # Qwen3-VL: a merger per index
    # A MoE layer's MLP: the router and the experts each token goes through (the active parameters).
    mlp = (3 * t.hidden_size * t.num_experts_per_tok * t.moe_intermediate_size + t.hidden_size * t.num_experts
           if hasattr(t, "num_experts") else 3 * t.hidden_size * t.intermediate_size)
    q_width = t.num_heads * t.head_dim
    text_params = t.num_layers * (t.hidden_size * (q_width + 2 * t.num_kv_heads * t.head_dim) +
                                  q_width * t.hidden_size + mlp)
    text_params += t.vocab_size * t.hidden_size  # lm_head
    vision_params = v.depth * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    merger = (v.hidden_size * 4) ** 2 + v.hidden_size * 4 * v.out_hidden_size
    tokens, vis_tokens = batch * seq, batch * patches
    flops = 6 * (text_params * tokens + (vision_params + (1 + deepstack) * merger / 4) * vis_tokens)
    flops += 12 * t.num_layers * tokens * seq * q_width
    flops += 12 * v.depth * vis_tokens * patches * v.hidden_size
    return flops


def _gemma3_flops_per_step(cfg, batch: int, seq: int, patches: int) -> float:
    """model_flops_per_step for Gemma 3: the same counts, with SigLIP's blocks (q/k/v/out + fc1/fc2, full
    attention over an image's `patches`), the projector's [vision, text] product on each image's
    mm_tokens_per_image pooled tokens, the tied lm_head (a product all the same), and the sliding layers'
    attention over at most `sliding_window` keys."""
    t, v = cfg.text, cfg.vision
    q_width = t.num_heads * t.head_dim
    text_params = t.num_layers * (t.hidden_size * (q_width + 2 * t.num_kv_heads * t.head_dim) +
                                  q_width * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    text_params += t.vocab_size * t.hidden_size  # lm_head (tied to the embedding: still a product)
    vision_params = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    projector = v.hidden_size * t.hidden_size * cfg.mm_tokens_per_image / patches  # per patch
    tokens, vis_tokens = batch * seq, batch * patches
    flops = 6 * (text_params * tokens + (vision_params + projector) * vis_tokens)
    keys = sum(min(seq, t.sliding_window) if sliding else seq for sliding in t.sliding)
    flops += 12 * tokens * keys * q_width
    flops += 12 * v.num_layers * vis_tokens * patches * v.hidden_size
    return flops


def _mllama_flops_per_step(cfg, batch: int, seq: int) -> float:
    """model_flops_per_step for Llama 3.2 Vision (the workload's 4 real tiles per sample): the self-attention
    layers' products and causal attention over the text; the cross-attention layers' q/o and MLP on the text, their
    k/v on the image's tile tokens, and attention from each text token to them; the vision encoder (local + global
    layers, full attention within the image's tiles) and the projector on every tile token; lm_head."""
    t, v = cfg.text, cfg.vision
    d, kv, n_cross = t.hidden_size, t.num_kv_heads * t.head_dim, len(t.cross_attention_layers)
    n_self = t.num_layers - n_cross
    mlp = 3 * d * t.intermediate_size
    tokens = batch * seq
    vis_tokens = batch * 4 * v.num_patches  # 4 tiles of num_patches tokens (the padded ones not counted)
    text_params = n_self * (2 * d * d + 2 * d * kv + mlp) + n_cross * (2 * d * d + mlp) + t.vocab_size * d
    image_params = n_cross * 2 * d * kv  # the cross-attention layers' k/v on the projected image states
    vision_params = ((v.num_hidden_layers + v.num_global_layers) * (4 * v.hidden_size**2 +
                                                                     2 * v.hidden_size * v.intermediate_size)
                     + v.output_dim * d)  # + the projector
    flops = 6 * (text_params * tokens + (image_params + vision_params) * vis_tokens)
    flops += 12 * n_self * tokens * seq * d  # causal attention counted in full, as for the other families
    flops += 12 * n_cross * tokens * 4 * v.num_patches * d
    flops += 12 * (v.num_hidden_layers + v.num_global_layers) * vis_tokens * 4 * v.num_patches * v.hidden_size
    return flops


def _llava_flops_per_step(cfg, batch: int, seq: int, patches: int) -> float:
    """model_flops_per_step for `llava` (one image of `patches` patches per sample): the text model's products, its
    causal attention (counted in full) and lm_head on every token; the vision tower's layers that run (CLIP read at
    -2 runs 23 of its 24) on each image's tokens (CLIP: the patches and the class token, 577 at 336 pixels; Pixtral:
    the patches, 784 at 448), with full attention among them; the projector (linear_1 from the joined feature
    layers, linear_2) on each image's features (CLIP "default": the 576 patches; Pixtral: 784). Patch embeddings
    are not counted (nor are they for the other families)."""
    t, v = cfg.text, cfg.vision
    q_width = t.num_heads * t.head_dim
    text_params = t.num_layers * (t.hidden_size * (q_width + 2 * t.num_kv_heads * t.head_dim) +
                                  q_width * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    text_params += t.vocab_size * t.hidden_size  # lm_head
    if cfg.pixtral:
        vis_layers, per_image = v.num_hidden_layers, patches
    else:  # the tower runs no layer past the deepest feature layer asked for (hidden state i: after layer i)
        vis_layers, per_image = max(cfg.feature_layers), patches + 1
    vision_params = vis_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    features = patches + (1 if cfg.keep_class_token and not cfg.pixtral else 0)
    projector = (v.hidden_size * len(cfg.feature_layers) + t.hidden_size) * t.hidden_size
    tokens = batch * seq
    flops = 6 * (text_params * tokens + vision_params * batch * per_image + projector * batch * features)
    flops += 12 * t.num_layers * tokens * seq * q_width
    flops += 12 * vis_layers * batch * per_image * per_image * v.hidden_size
    return flops


KINDS = (("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
         ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "triton_gemm")),
         ("copies (memcpy, memset)", ("memcpy", "memset")),
         ("other (XLA fusions)", ("",)))


def _kind(name: str) -> str:
    low = name.lower()
    return next(k for k, keys in KINDS if any(key in low for key in keys))


def _summary(kernels: dict, ops: dict, steps: int, **extra) -> dict:
    """kernels/ops: name -> [total ms, count] over `steps` steps."""
    by_kind: dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        by_kind[_kind(name)] = by_kind.get(_kind(name), 0.0) + ms

    def top(table, n=300):
        rows = sorted(table.items(), key=lambda kv: -kv[1][0])[:n]
        return [(name[:140], round(ms / steps, 3), count // steps) for name, (ms, count) in rows]
    return dict(gpu_kernel_ms_per_step=round(sum(v[0] for v in kernels.values()) / steps, 3),
                by_kind_ms={k: round(v / steps, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                top_kernels_ms=top(kernels), top_ops_ms=top(ops), **extra)


def summarize_jax_trace(trace_dir: str, steps: int) -> dict:
    """GPU time per step from a jax.profiler trace (xplane.pb): by kernel kind, the top kernels of the
    stream lines, and the top HLO ops of the "XLA Ops" line (the op that launched each kernel)."""
    import glob

    from jax.profiler import ProfileData
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    kernels: dict[str, list] = {}
    ops: dict[str, list] = {}
    for plane in ProfileData.from_file(path).planes:
        if "GPU" not in plane.name.upper():
            continue
        for line in plane.lines:
            table = ops if line.name == "XLA Ops" else kernels if line.name.startswith("Stream") else None
            if table is None:
                continue
            for ev in line.events:
                entry = table.setdefault(ev.name, [0.0, 0])
                entry[0] += ev.duration_ns / 1e6
                entry[1] += 1
    return _summary(kernels, ops, steps)


def torch_cupti_trace(run, steps: int, timeline: str | None = None) -> dict:
    """GPU kernels of `run()` (JAX's included: CUPTI sees the whole process) through torch's profiler,
    for where jax.profiler crashes. Kernel names are XLA's fusion names (see `name_kernels`) or library
    kernels (cuBLAS nvjet/sm90 GEMMs, cuDNN attention). Also the time the GPU was busy (any kernel), and where it
    idled. With `timeline` (a .json.gz path): every GPU span (kernels, copies) as [start us, duration us, name],
    the start from the first span's, for a look at single steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    kernels: dict[str, list] = {}
    spans = []
    for ev in prof.events():
        dt = getattr(ev, "device_time", None)
        if dt is None or not str(getattr(ev, "device_type", "")).endswith("CUDA"):
            continue
        entry = kernels.setdefault(ev.name, [0.0, 0])
        entry[0] += dt / 1e3
        entry[1] += 1
        spans.append((ev.time_range.start, ev.time_range.end, ev.name))
    busy, gaps = busy_and_gaps(spans)
    if timeline:
        import gzip
        t0 = min((a for a, _, _ in spans), default=0)
        with gzip.open(timeline, "wt") as f:
            json.dump(sorted([round(a - t0, 1), round(b - a, 1), name] for a, b, name in spans), f)
    return _summary(kernels, {}, steps, busy_ms_per_step=round(busy / 1e3 / steps, 3), **idle_gaps(gaps, spans))


def busy_and_gaps(spans: list) -> tuple[float, list]:
    """spans: (start, end, name) of the GPU's kernels, in us. The union of their intervals (the time the GPU was
    busy), and the idle gaps between them: (us, start of the next kernel, the kernel that ended last, the next)."""
    busy, end, last, gaps = 0.0, None, None, []
    for a, b, name in sorted(spans):
        if end is not None and a > end:
            gaps.append((a - end, a, last, name))
        if end is None or a > end:
            busy, end, last = busy + b - a, b, name
        elif b > end:
            busy, end, last = busy + b - end, b, name
    return busy, gaps


def idle_gaps(gaps: list, spans: list, top: int = 60) -> dict:
    """Where the GPU idled between kernels: gaps (us, at, kernel before, kernel after) summed by size (the trace's
    first step may hold host work such as tracing) and the largest ones, each with its offset from the trace's
    first kernel in ms and the kernels on either side (XLA's fusion names; `name_kernels` names them), and the idle
    time summed by the kernel it followed. Over the whole trace, not per step."""
    t0 = min(a for a, _, _ in spans) if spans else 0
    bins = {"<10us": [0.0, 0], "10-100us": [0.0, 0], "100us-1ms": [0.0, 0], ">1ms": [0.0, 0]}
    after: dict[str, list] = {}
    for us, _, before, _ in gaps:
        key = "<10us" if us < 10 else "10-100us" if us < 100 else "100us-1ms" if us < 1000 else ">1ms"
        for entry in (bins[key], after.setdefault(before, [0.0, 0])):
            entry[0] += us / 1e3
            entry[1] += 1
    largest = sorted(gaps, reverse=True)[:top]
    return dict(idle_ms_by_gap={k: [round(ms, 3), n] for k, (ms, n) in bins.items()},
                idle_ms_after=[(name[:80], round(ms, 3), n) for name, (ms, n) in
                               sorted(after.items(), key=lambda kv: -kv[1][0])[:top]],
                largest_gaps=[(round(us, 1), round((at - t0) / 1e3, 3), before[:80], after[:80])
                              for us, at, before, after in largest])


def keep_hlo_dump(dump_dir: str, out_dir: str, name: str = "") -> str | None:
    """The largest optimized HLO module of an XLA dump (the training step; with `name`, the largest whose file name
    holds it), gzipped into out_dir as `<name or step>_hlo.txt.gz`; returns its text."""
    import glob
    import gzip
    files = [f for f in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")) if name in os.path.basename(f)]
    if not files:
        return None
    with open(max(files, key=os.path.getsize)) as f:
        text = f.read()
    with gzip.open(os.path.join(out_dir, f"{name or 'step'}_hlo.txt.gz"), "wt") as f:
        f.write(text)
    return text


def name_kernels(rows: list, hlo: str | dict) -> list:
    """Each [kernel, ms, count] row of XLA's own kernels (fusion `loop_add_fusion_2` is HLO instruction
    `%loop_add_fusion.2`) with the instruction's shape and the jax op it came from. `hlo`: one program's optimized
    HLO, or {program name: its HLO} for a trace of several programs, whose fusion names overlap: a row then gets
    "program: shape op" for every program that has an instruction of that name (the trace cannot tell which ran)."""
    import re
    programs = hlo if isinstance(hlo, dict) else {"": hlo}
    found = {}
    for program, text in programs.items():
        for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+) [\w-]+\((.*)$", text, re.M):
            op = re.search(r'op_name="([^"]*)"', m.group(3))
            found.setdefault(m.group(1), []).append((program, m.group(2)[:60], op.group(1)[-100:] if op else ""))
    named = []
    for row in rows:
        hits = found.get(re.sub(r"_(\d+)$", r".\1", row[0]), found.get(row[0], []))
        if not isinstance(hlo, dict):
            named.append([*row, *hits[0][1:]] if hits else list(row))
        else:
            named.append([*row, *(f"{program}: {shape} {op}" for program, shape, op in hits)])
    return named


def synthetic_trainer(model, cfg, batch: int, text: int, image: int, mesh=None, loss_chunk: int = 512):
    """(`trainer(n)`: an SFTTrainer of n steps, seq): every step the same synthetic batch (what the processor returns
    for `batch` samples of one `image`-pixel image + `text` tokens, labels on the text only), the global one, or on a
    mesh (families with PER_SHARD_INPUTS) `batch` samples per data x fsdp coordinate, as the trainer's per-shard
    collation gives them. `batch` is per data x fsdp coordinate (per_device_train_batch_size)."""
    from jaxvlm.sharding import BATCH_AXES, mesh_size
    from jaxvlm.train.trainer import SFTConfig, SFTTrainer
    dp = 1 if mesh is None else mesh_size(mesh, BATCH_AXES)
    raw, shard_raw = raw_batch(cfg, batch * dp, text, image), raw_batch(cfg, batch, text, image)
    labels, shard_labels = raw["input_ids"].copy(), shard_raw["input_ids"].copy()
    labels[:, :image_prefix(cfg, image)] = -100
    shard_labels[:, :image_prefix(cfg, image)] = -100

    class SyntheticTrainer(SFTTrainer):
        def micro_batch(self, index):
            return {**raw, "labels": labels}, list(range(batch * dp))

        def per_shard(self):  # BENCH_PER_SHARD=0: the global batch, its packed vision arrays replicated
            return dp > 1 and type(model).PER_SHARD_INPUTS and os.environ.get("BENCH_PER_SHARD", "1") == "1"

        def shard_batches(self, index, shards):
            return {s: {**shard_raw, "labels": shard_labels} for s in shards}, list(range(batch * dp))

    def trainer(n):
        return SyntheticTrainer(model, processing_class=None, data_collator=lambda *a, **k: None,
                                train_dataset=[{}], args=SFTConfig(
                                    per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                                    max_steps=n, learning_rate=1e-4, optim="adamw_torch", logging_steps=0,
                                    output_dir="/tmp/bench_train", loss_chunk_size=loss_chunk, mesh=mesh))
    return trainer, raw["input_ids"].shape[1]


def run_one(batch: int, weights: str, remat: str, attn: str, loss_chunk: int, text: int = 256, steps: int = 13,
            trace: str | None = None, trace_tool: str = "torch", geometry: str = "qwen2-vl-2b",
            tiny: bool = False, lora_experts: str = "auto", mesh: str | None = None) -> dict:
    from jaxvlm import FastVisionModel, layers
    from jaxvlm.sharding import BATCH_AXES, make_mesh, mesh_size
    from jaxvlm.lora import count_parameters
    layers.attention_implementation = attn
    model_cls, cfg = load_geometry(geometry, tiny)
    image = workload_image(cfg, tiny)
    # With a mesh, `batch` is per data x fsdp coordinate (per_device_train_batch_size), as in the trainer.
    mesh = make_mesh(mesh) if mesh else None
    n_dev, dp = (1, 1) if mesh is None else (mesh.size, mesh_size(mesh, BATCH_AXES))
    model = random_model(cfg, jnp.bfloat16, nf4=weights == "nf4", model_cls=model_cls, mesh=mesh)
    model.max_seq_length = max(2048, raw_batch(cfg, 1, text, image)["input_ids"].shape[1])
    # Unsloth's targets; on a mixture of experts they include the experts' weights unless lora_experts="off".
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16,
                                           **({"target_parameters": []} if lora_experts == "off" else {}))
    trainable = count_parameters(model)[0]
    FastVisionModel.for_training(model, use_gradient_checkpointing=False if remat == "none" else remat)
    grid, _ = image_tokens(cfg, image)
    trainer, seq = synthetic_trainer(model, cfg, batch, text, image, mesh, loss_chunk)
    if trace:  # profile only (its own process: the profiler has crashed a lent H100 process)
        os.makedirs(trace, exist_ok=True)
        trainer(2).train()  # compile and warm up; then profile 3 steps of a warm trainer
        if trace_tool == "jax":
            jax.profiler.start_trace(trace)
            trainer(3).train()
            jax.profiler.stop_trace()
            summary = summarize_jax_trace(trace, 3)
        else:
            tr = trainer(3)
            summary = torch_cupti_trace(tr.train, 3, os.path.join(trace, "timeline.json.gz"))
        hlo = keep_hlo_dump(os.environ.get("JAXVLM_BENCH_DUMP", ""), trace)
        if hlo:
            summary["top_kernels_ms"] = name_kernels(summary["top_kernels_ms"], hlo)
            if "largest_gaps" in summary:  # the kernels on either side of each gap, named once
                names = sorted({n for gap in summary["largest_gaps"] for n in gap[2:]})
                named = {row[0]: row for row in name_kernels([[n] for n in names], hlo)}
                summary["largest_gaps"] = [[*gap[:2], named[gap[2]], named[gap[3]]]
                                           for gap in summary["largest_gaps"]]
        out = dict(bench="train-trace", tool=trace_tool, geometry=geometry, weights=weights, remat=remat,
                   attn=attn, loss_chunk=loss_chunk, batch=batch, device=jax.devices()[0].device_kind,
                   **summary)
        with open(os.path.join(trace, "summary.json"), "w") as f:
            json.dump(out, f, indent=1)
        return out
    t0 = time.perf_counter()
    tr = trainer(steps)
    tr.train()
    wall = time.perf_counter() - t0
    step_s = float(np.median([batch * dp * seq / r["tokens_per_s"] for r in tr.log_history[3:]]))
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
    flops = model_flops_per_step(cfg, batch * dp, seq, grid * grid)
    # tokens_per_s, peak_gib and mfu are per device (the most loaded one for the peak); batch per data x fsdp.
    out = dict(bench="train", impl="jaxvlm", geometry=geometry, weights=weights, remat=remat, attn=attn,
               loss_chunk=loss_chunk, batch=batch, seq=seq, device=jax.devices()[0].device_kind,
               step_s=round(step_s, 4), tokens_per_s=round(batch * dp * seq / step_s / n_dev),
               peak_gib=round(peak / 2**30, 2), peak_bytes=int(peak),
               mfu=round(flops / step_s / n_dev / H100_BF16_FLOPS, 3), run_s=round(wall, 1), trainable=trainable,
               lora_experts=lora_experts if hasattr(cfg.text, "num_experts") else None,
               **({"mesh": dict(mesh.shape), "devices": n_dev} if mesh is not None else {}),
               **({"settings": settings} if (settings := run_settings()) else {}))
    return out


def run_settings() -> dict:
    """The process's jaxvlm settings (JAXVLM_*, read at trace time) and XLA_FLAGS, so that a line says what ran."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("JAXVLM_") or k == "XLA_FLAGS"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--weights", nargs="+", default=["bf16"], choices=["bf16", "nf4"])
    ap.add_argument("--remat", nargs="+", default=["unsloth"],
                    help="unsloth (host offload), full, attention, dots, none")
    ap.add_argument("--attn", nargs="+", default=["auto"], help="auto (cuDNN on a GPU), xla, cudnn")
    ap.add_argument("--loss-chunk", type=int, nargs="+", default=[512], help="tokens per loss chunk; 0: all logits")
    ap.add_argument("--text", type=int, default=256, help="text tokens per sample (beside the image's 256 tokens "
                                                          "for Qwen2-VL, 196 for Qwen3-VL, 256 + 4 for Gemma 3)")
    ap.add_argument("--geometry", default="qwen2-vl-2b", choices=sorted(GEOMETRIES))
    ap.add_argument("--trace", help="profile the first configuration into this directory")
    ap.add_argument("--trace-tool", default="torch", choices=["torch", "jax"],
                    help="torch: CUPTI through torch's profiler (jax.profiler crashed on the lent H100)")
    ap.add_argument("--lora-experts", nargs="+", default=["auto"], choices=["auto", "off"],
                    help="a mixture of experts' weights: auto (Unsloth's default, adapted) or off (attention only)")
    ap.add_argument("--mesh", nargs="+", default=[None],
                    help="device meshes (jaxvlm.sharding), e.g. fsdp=4 data=2,fsdp=2; --batch is then per data x "
                         "fsdp coordinate and tokens/s, peak and MFU are per device")
    ap.add_argument("--one", help="(internal) one configuration as JSON")
    # the family's tiny config, 64-pixel images (Gemma 3: the tiny tower's 28)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))), flush=True)
        return
    runs = [dict(batch=b, weights=weights, remat=remat, attn=attn, loss_chunk=chunk, text=args.text,
                 geometry=args.geometry, lora_experts=experts, mesh=mesh, **({"tiny": True} if args.tiny else {}))
            for mesh, experts, weights, remat, attn, chunk, b in itertools.product(
                args.mesh, args.lora_experts, args.weights, args.remat, args.attn, args.loss_chunk, args.batch)]
    if args.trace:  # the first configuration once more, under the profiler, after all measurements
        runs.append(dict(runs[0], trace=args.trace, trace_tool=args.trace_tool))
    for one in runs:
        env = dict(os.environ)
        if one.get("trace"):  # keep the optimized HLO, to name the kernels of the profile
            dump = tempfile.mkdtemp(prefix="xla_dump_")
            env["JAXVLM_BENCH_DUMP"] = dump
            env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
        r = subprocess.run([sys.executable, "-m", "scripts.bench_train", "--one", json.dumps(one)], env=env)
        if r.returncode:
            print(json.dumps(dict(bench="train", error=f"exit {r.returncode}", **one)), flush=True)


if __name__ == "__main__":
    main()
