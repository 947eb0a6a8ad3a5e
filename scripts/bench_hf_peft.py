"""The peer of bench_train for any geometry of bench_common: transformers + PEFT LoRA training step, with the
frozen base in bf16 or in bitsandbytes NF4.

On the lent GPU machine (bitsandbytes for --quant nf4 from `.peers/bnb`, built by scripts/fetch_peers.sh, carried):

    PYTHONPATH=.peers/bnb:. python scripts/bench_hf_peft.py --geometry qwen3-vl-2b --batch 4 8 --quant bf16 nf4
    PYTHONPATH=.peers/bnb:. python scripts/bench_hf_peft.py --geometry gemma3-4b --batch 4 8 --quant bf16 nf4

The workload of bench_train (and of ../shared/bench/hf_peft_step.py, which is Qwen2-VL only): random weights, each
sample one 448x448 image (bench_common.image_tokens: 256 merged tokens for Qwen2-VL, 196 for Qwen3-VL; Gemma 3: one
896x896 image, 256 tokens in "\\n\\n<boi>" .. "<eoi>\\n\\n", token_type_ids 1 at them; mllama and llava: bench_common's
layouts) + `--text` tokens, labels on the text only, LoRA r=16 alpha=16 on the modules Unsloth's default regex picks
(jaxvlm.targets.get_peft_regex over the torch model's Linear names), gradient checkpointing, torch AdamW lr 1e-4,
sdpa attention; median step of 10 after 3 warm-ups.

--quant bf16: the model built on the GPU from its config. --quant nf4: the random bf16 model is saved once to
`--dir` (default /tmp/bench_hf_<geometry>; 4.3 GB for a 2B geometry) and loaded with from_pretrained and
BitsAndBytesConfig(load_in_4bit, nf4, bf16 compute, double quant), the Linear modules that jaxvlm keeps 16-bit
(the family's INFO.quant_skip, as Unsloth keeps them) named in llm_int8_skip_modules; then the same LoRA and
gradient checkpointing as bf16 (no peft.prepare_model_for_kbit_training, which Unsloth does not use either).
Experts of MoE models are 3-D parameters, not Linear: bitsandbytes leaves them bf16, and LoRA leaves them alone.

Each --quant runs in its own process (building the model once for all batch sizes); one JSON line per batch
size, or one with "error" for a process that failed ("error": "OOM" for the batch size that ran out of GPU memory,
the larger ones not tried).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# bench_common imports JAX: keep it on the CPU, so that it takes none of the GPU memory torch measures.
os.environ["JAX_PLATFORMS"] = "cpu"

import torch  # noqa: E402

from jaxvlm.targets import get_peft_regex  # noqa: E402
from scripts.bench_common import (GEOMETRIES, hf_geometry, hf_inputs, image_prefix, image_tokens,  # noqa: E402
                                  is_gemma3, is_llava, is_mllama, load_geometry, peer_versions, raw_batch,
                                  save_random_hf_model, vision_tower, workload_image)


def skipped_linears(hf_config, skip) -> list[str]:
    """Full names of the model's Linear modules that have a `skip` name as a path component (jaxvlm.quantize's
    rule), found on a meta-device model. Full names mean the same under every transformers version's matching of
    llm_int8_skip_modules (substrings in 4.x; path prefixes, regexes or suffixes in 5.x)."""
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(s in n.split(".") for s in skip)]


def load_model(geometry: str, quant: str, device: str, path: str | None, tiny: bool):
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    hf_config = hf_geometry(geometry, tiny)
    if quant == "bf16":
        torch.manual_seed(0)
        with torch.device(device):
            return AutoModelForImageTextToText.from_config(hf_config, dtype=torch.bfloat16,
                                                           attn_implementation="sdpa")
    model_cls, _ = load_geometry(geometry, tiny)
    save_random_hf_model(geometry, path, tiny)
    if device == "cuda":
        torch.cuda.empty_cache()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             bnb_4bit_use_double_quant=True,
                             llm_int8_skip_modules=skipped_linears(hf_config, model_cls.INFO.quant_skip))
    return AutoModelForImageTextToText.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                       attn_implementation="sdpa", device_map={"": device})


def impl_name(quant: str) -> str:
    return "transformers+peft" + ("+bnb" if quant == "nf4" else "")


def run(geometry: str, quant: str, batches: list[int], text: int, path: str | None, tiny: bool = False,
        lora_experts: str = "auto"):
    """Yields one result dict per batch size, the model built once."""
    from peft import LoraConfig, get_peft_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, cfg = load_geometry(geometry, tiny)
    image = workload_image(cfg, tiny)
    t0 = time.perf_counter()
    model = load_model(geometry, quant, device, path, tiny)
    load_s = time.perf_counter() - t0
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    info = dict(load_s=round(load_s, 1), versions=peer_versions())
    if hasattr(cfg.text, "num_experts"):  # which of transformers' MoE kernels ran (grouped_mm, eager, ...)
        try:
            info["experts_implementation"] = model.config.get_text_config()._experts_implementation
        except Exception as e:  # an older transformers: record why, go on
            info["experts_implementation"] = f"unknown ({type(e).__name__})"
    if quant == "nf4":
        import bitsandbytes as bnb
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        info.update(n_linear4bit=n4, n_linear16=len(linears) - n4)
    # Unsloth's targets: its regex over the Linear layers, and on a mixture of experts both expert weights
    # (PEFT's target_parameters) unless lora_experts="off".
    experts = (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
               if hasattr(cfg.text, "num_experts") and lora_experts == "auto" else None)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=get_peft_regex(linears),
                      target_parameters=experts)
    info["lora_experts"] = lora_experts if hasattr(cfg.text, "num_experts") else None
    model = get_peft_model(model, lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    vision = vision_tower(cfg)
    grid, n_img = image_tokens(cfg, image)
    prefix = image_prefix(cfg, image)
    for batch in batches:
        seq = prefix + text
        # bench_common's batch (Gemma 3: token_type_ids; mllama: tiles; llava: Pixtral's image_sizes)
        if is_gemma3(cfg) or is_mllama(cfg) or is_llava(cfg):
            kw = hf_inputs(cfg, raw_batch(cfg, batch, text, image), device)
            ids = kw["input_ids"]
        else:
            torch.manual_seed(0)
            ids = torch.randint(0, min(150000, cfg.vision_start_token_id), (batch, seq), device=device)
            ids[:, 0] = cfg.vision_start_token_id
            ids[:, 1:1 + n_img] = cfg.image_token_id
            ids[:, 1 + n_img] = cfg.vision_start_token_id + 1
            pixels = torch.randn(batch * grid * grid, vision.patch_dim, device=device, dtype=torch.bfloat16)
            thw = torch.tensor([[1, grid, grid]] * batch, device=device)
            kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_grid_thw=thw,
                      mm_token_type_ids=(ids == cfg.image_token_id).long())
        assert ids.shape == (batch, seq), (ids.shape, seq)
        labels = ids.clone()
        labels[:, :prefix] = -100
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            out = model(**kw, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss

        for _ in range(3):
            step()
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(10):
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        yield dict(bench="train", impl=impl_name(quant), geometry=geometry,
                   quant=quant, weights=quant, remat="full", batch=batch, seq=seq, image_tokens=n_img,
                   device=torch.cuda.get_device_name() if device == "cuda" else "cpu", step_s=round(step_s, 4),
                   tokens_per_s=round(batch * seq / step_s), peak_gib=round(peak, 2),
                   loss=round(float(loss.detach()), 4), **info)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="qwen3-vl-2b", choices=sorted(GEOMETRIES))
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--quant", nargs="+", default=["bf16"], choices=["bf16", "nf4"])
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--dir", help="where --quant nf4 saves (once) and loads the random bf16 model "
                                  "(default /tmp/bench_hf_<geometry>)")
    ap.add_argument("--lora-experts", default="auto", choices=["auto", "off"],
                    help="a mixture of experts' weights: auto (Unsloth's default, adapted) or off (attention only)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # (internal) run this --quant in this process
    # the family's tiny config, 64-pixel images (Gemma 3: the tiny tower's 28)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = args.dir or f"/tmp/bench_hf_{args.geometry}{'_tiny' if args.tiny else ''}"
    if args.one:
        done = []
        try:
            for line in run(args.geometry, args.one, args.batch, args.text, path, args.tiny, args.lora_experts):
                done.append(line["batch"])
                print(json.dumps(line), flush=True)
        except torch.cuda.OutOfMemoryError as e:  # what does not fit is a result too: its own line, no traceback
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            print(json.dumps(dict(bench="train", impl=impl_name(args.one), geometry=args.geometry, quant=args.one,
                                  weights=args.one, batch=next((b for b in args.batch if b not in done), None),
                                  error="OOM", detail=str(e).splitlines()[0][:300], peak_gib=round(peak, 2))),
                  flush=True)
        return
    for quant in args.quant:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", quant, "--geometry", args.geometry,
               "--batch", *map(str, args.batch), "--text", str(args.text), "--dir", path,
               "--lora-experts", args.lora_experts, *(["--tiny"] if args.tiny else [])]
        r = subprocess.run(cmd)
        if r.returncode:
            print(json.dumps(dict(bench="train", impl="transformers+peft", geometry=args.geometry, quant=quant,
                                  batch=args.batch, error=f"exit {r.returncode}")), flush=True)


if __name__ == "__main__":
    main()
