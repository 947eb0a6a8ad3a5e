"""Unsloth peer of the LoRA training-step benchmark (PyTorch, CUDA).

Same workload as the HF+PEFT baseline (shared/bench/hf_peft_step.py): a Qwen2-VL-2B-shaped model with random
weights, batch B of one 448x448 image (1024 patches, 256 merged tokens) plus 256 text tokens, labels masked on
the image prefix, LoRA r=16 alpha=16 on vision + language attention + MLP, AdamW lr 1e-4; 3 warm-up steps, then
the median of 10 timed steps, peak memory from torch.cuda.max_memory_allocated. The model goes through Unsloth's
public API: FastVisionModel.from_pretrained (bf16, or load_in_4bit=True for NF4), get_peft_model, for_training.

The random model and an offline-built processor are saved once to MODEL_DIR (default /tmp/unsloth_bench_qwen2vl)
by a separate process, so that each measured process imports unsloth before transformers and peft.

Needs unsloth, unsloth_zoo, trl, datasets and bitsandbytes importable (on the lent GPU machine:
PYTHONPATH=.peers/bnb:.peers/unsloth). Usage:

    python scripts/bench_unsloth.py --batch 4 8 --q4 0 1     # one subprocess per config, one JSON line each
    B=4 Q4=1 python scripts/bench_unsloth.py --child          # a single config in this process

A config that fails prints a JSON line with the error and the end of its traceback.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback

MODEL_DIR = os.environ.get("MODEL_DIR", "/tmp/unsloth_bench_qwen2vl")
TXT = int(os.environ.get("TXT", 256))
# The GPU machines are offline: no hub look-ups, no Unsloth usage statistics.
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
IMG = int(os.environ.get("IMG", 448))

# Qwen2 special-token ids (as in the released Qwen2-VL tokenizer).
_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
            "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649,
            "<|quad_start|>": 151650, "<|quad_end|>": 151651, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
def save_processor(path):
    """An offline Qwen2-VL processor: a word-level tokenizer whose 151,643 plain ids are placeholders and whose
    special tokens sit at Qwen2's ids, the chat template, and the Qwen2-VL image/video processors."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLProcessor

    from jaxvlm.models.qwen2_vl import Qwen2VLForConditionalGeneration
    _CHAT_TEMPLATE = Qwen2VLForConditionalGeneration.TINY.chat_template  # Qwen2-VL's template (no tools)
    vocab = {f"t{i}": i for i in range(151643)}
    vocab.update(_SPECIAL)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", chat_template=_CHAT_TEMPLATE)
    try:
        from transformers import Qwen2VLImageProcessor
        image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=IMG * IMG)
    except Exception:
        from transformers import Qwen2VLImageProcessorPil
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=IMG * IMG)
    try:  # the video processor needs torchvision
        from transformers import Qwen2VLVideoProcessor
        proc = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(), chat_template=_CHAT_TEMPLATE)
    except Exception:
        try:
            proc = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=_CHAT_TEMPLATE)
        except Exception:  # no torchvision at all: write the parts; AutoProcessor assembles them
            tokenizer.save_pretrained(path)
            image_processor.save_pretrained(path)
            with open(os.path.join(path, "chat_template.jinja"), "w") as f:
                f.write(_CHAT_TEMPLATE)
            return
    proc.save_pretrained(path)


def prep(path):
    """Saves the random bf16 Qwen2-VL-2B-shaped model and the processor to `path` (no unsloth in this process)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from scripts.bench_common import qwen2_vl_2b_hf_config  # the workload's geometry
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = Qwen2VLForConditionalGeneration._from_config(qwen2_vl_2b_hf_config(), dtype=torch.bfloat16)
    model.save_pretrained(path)
    save_processor(path)
    open(os.path.join(path, "DONE"), "w").close()


def ensure_model_dir():
    if not os.path.exists(os.path.join(MODEL_DIR, "DONE")):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--prep", MODEL_DIR], check=True)


def child():
    B = int(os.environ.get("B", 4))
    Q4 = os.environ.get("Q4", "0") == "1"
    impl = "unsloth nf4" if Q4 else "unsloth bf16"
    res = dict(impl=impl, B=B)
    try:
        ensure_model_dir()
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_compiled_cache")
        import unsloth  # before transformers and peft
        from unsloth import FastVisionModel
        import torch
        res["unsloth"] = unsloth.__version__
        res["device"] = torch.cuda.get_device_name()
        t0 = time.perf_counter()
        model, processor = FastVisionModel.from_pretrained(
            MODEL_DIR, load_in_4bit=Q4, dtype=torch.bfloat16, use_gradient_checkpointing="unsloth")
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
            finetune_mlp_modules=True, r=16, lora_alpha=16, lora_dropout=0, bias="none")
        FastVisionModel.for_training(model)
        res["load_s"] = time.perf_counter() - t0
        res["params"] = sum(p.numel() for p in model.parameters())
        res["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if Q4:
            import bitsandbytes as bnb
            res["n_linear4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        cfg = model.config
        grid = IMG // 14
        n_patches = grid * grid
        n_img_tok = n_patches // 4
        seq = n_img_tok + TXT + 2
        torch.manual_seed(0)
        ids = torch.randint(0, 150000, (B, seq), device="cuda")
        ids[:, 0] = cfg.vision_start_token_id
        ids[:, 1:1 + n_img_tok] = cfg.image_token_id
        ids[:, 1 + n_img_tok] = cfg.vision_end_token_id
        pix = torch.randn(B * n_patches, 3 * 2 * 14 * 14, device="cuda", dtype=torch.bfloat16)
        thw = torch.tensor([[1, grid, grid]] * B, device="cuda")
        mm = torch.zeros_like(ids); mm[ids == cfg.image_token_id] = 1
        labels = ids.clone(); labels[:, :2 + n_img_tok] = -100
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, image_grid_thw=thw,
                        labels=labels, mm_token_type_ids=mm)
            out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            return out.loss

        losses = [float(step().detach()) for _ in range(3)]
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(10):
            torch.cuda.synchronize(); t = time.perf_counter(); loss = step(); torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
        times.sort(); med = times[len(times) // 2]
        res.update(seq=seq, img=IMG, step_s=med, tokens_per_s=B * seq / med,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, losses=[round(x, 4) for x in losses])
    except BaseException as e:
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        res["traceback"] = traceback.format_exc().splitlines()[-25:]
    print(json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[4])
    ap.add_argument("--q4", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--child", action="store_true", help="run the config in env B, Q4 in this process")
    ap.add_argument("--prep", metavar="DIR", help="only save the random model and processor to DIR")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per config")
    ap.add_argument("--log", help="append each child's full output to this file")
    args = ap.parse_args()
    if args.prep:
        return prep(args.prep)
    if args.child:
        return child()
    try:
        ensure_model_dir()
    except Exception as e:
        print(json.dumps(dict(impl="unsloth", error=f"model prep failed: {e}")), flush=True)
        return
    for q4 in args.q4:
        for b in args.batch:
            env = dict(os.environ, B=str(b), Q4=str(q4))
            impl = "unsloth nf4" if q4 else "unsloth bf16"
            try:
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                                   capture_output=True, text=True, timeout=args.timeout)
                out, err, rc = p.stdout, p.stderr, p.returncode
            except subprocess.TimeoutExpired as e:
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
                rc = "timeout"
            if args.log:
                with open(args.log, "a") as f:
                    f.write(f"===== {impl} B={b} rc={rc}\n--- stdout\n{out}\n--- stderr\n{err}\n")
            line = None
            for ln in reversed(out.splitlines()):
                if ln.startswith("{") and '"impl"' in ln:
                    line = ln; break
            if line is None:
                tail = (out + "\n" + err).strip().splitlines()[-25:]
                line = json.dumps(dict(impl=impl, B=b, error=f"child exited rc={rc} without a result",
                                       traceback=tail))
            print(line, flush=True)


if __name__ == "__main__":
    main()
