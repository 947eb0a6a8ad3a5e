"""Teach a VLM to read handwritten digits: LoRA fine-tuning end to end, on a CPU in a few minutes.

    python scripts/demo.py                       # a small random Qwen2-VL made from jaxvlm.tiny's config
    python scripts/demo.py --steps 40 --eval 96  # a shorter run (CI)
    python scripts/demo.py --model Qwen/Qwen2-VL-2B-Instruct --dtype bfloat16   # a real checkpoint, on a GPU
    python scripts/demo.py --video               # videos: which digit comes last in a 4-frame clip

Data: scikit-learn's handwritten digits (1797 8x8 scans, shipped with the package), drawn as images and
asked "Which digit is this?" (with --video: 4-frame clips showing one digit, then another, asked "Which
digit comes last?", so the answer is in the second half of the clip only). Prints the held-out accuracy before and after training (the answer is
the digit token the model ranks first among 0-9), and writes the LoRA adapter and the loss curve.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile

import numpy as np
from PIL import Image

# transformers' advice that PyTorch is missing is right and beside the point here (jaxvlm needs no torch).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jaxvlm import FastVisionModel  # noqa: E402
from jaxvlm.train import VisionDataCollator  # noqa: E402
from jaxvlm.train.trainer import SFTConfig, SFTTrainer  # noqa: E402

QUESTION = "Which digit is this?"
VIDEO_QUESTION = "Which digit comes last?"


def digit_records(seed: int = 0, size: int = 56):
    """(train, held-out) chat records of scikit-learn's digits, each scan upscaled to size x size RGB."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    records = []
    for i in order:
        pixels = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        image = Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB")
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": str(digits.target[i])}]},
        ], "label": int(digits.target[i])})
    n_test = len(records) // 6
    return records[n_test:], records[:n_test]


def digit_video_records(seed: int = 0, size: int = 56):
    """(train, held-out) chat records of 4-frame clips: frames 1-2 one digit's scan, frames 3-4 another's."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    scans = [Image.fromarray((255 - d * (255 / 16)).astype(np.uint8)).resize((size, size), Image.NEAREST)
             .convert("RGB") for d in digits.images]
    records = []
    for first, last in rng.integers(0, len(scans), (len(scans), 2)):
        clip = [scans[first], scans[first], scans[last], scans[last]]
        records.append({"messages": [
            {"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": VIDEO_QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": str(digits.target[last])}]},
        ], "label": int(digits.target[last])})
    n_test = len(records) // 6
    return records[n_test:], records[:n_test]


def accuracy(model, processor, records, batch_size: int = 32) -> float:
    """Share of records whose digit the model ranks first among the ten digit tokens after the prompt."""
    tok = processor.tokenizer
    digit_ids = np.array([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    FastVisionModel.for_inference(model)
    correct = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [processor.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
                   for r in chunk]
        media = [r["messages"][0]["content"][0] for r in chunk]
        if media[0]["type"] == "video":
            batch = processor(text=prompts, videos=[m["video"] for m in media], padding=True, return_tensors="np")
        else:
            batch = processor(text=prompts, images=[m["image"] for m in media], padding=True, return_tensors="np")
        mask = batch["attention_mask"]
        last = np.where(mask[:, -1] == 1, mask.shape[1] - 1, mask.sum(-1) - 1)  # left or right padding
        logits = np.asarray(model(**batch), np.float32)[np.arange(len(chunk)), last][:, digit_ids]
        correct += int((logits.argmax(-1) == np.array([r["label"] for r in chunk])).sum())
    return correct / len(records)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir or hub id (default: a small random Qwen2-VL)")
    ap.add_argument("--dtype", default=None, help="float32 (default for the small model) or bfloat16")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--eval", type=int, default=None, help="held-out records to score (default: all 299)")
    ap.add_argument("--output", default="out/demo", help="adapter, loss plot and log go here")
    ap.add_argument("--video", action="store_true", help="train on 4-frame clips instead of images")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model_name = args.model
    if model_name is None:
        from jaxvlm.tiny import save_random_model
        model_name = tempfile.mkdtemp(prefix="jaxvlm-demo-")
        save_random_model(model_name, "qwen2_vl", size="demo")
    dtype = args.dtype or ("float32" if args.model is None else "bfloat16")
    model, processor = FastVisionModel.from_pretrained(model_name, dtype=dtype, load_in_4bit=False,
                                                       max_seq_length=256)
    train, held_out = digit_video_records() if args.video else digit_records()
    held_out = held_out[:args.eval] if args.eval else held_out
    print(f"held-out accuracy before training: {accuracy(model, processor, held_out):.1%} "
          f"({len(held_out)} {'clips' if args.video else 'digits'}, chance 10%)")

    model = FastVisionModel.get_peft_model(model, r=args.rank, lora_alpha=args.rank, random_state=0)
    FastVisionModel.for_training(model)
    collator = VisionDataCollator(model, processor, train_on_responses_only=True,
                                  instruction_part=type(model).INFO.instruction_part,
                                  response_part=type(model).INFO.response_part)
    trainer = SFTTrainer(model, processor, collator, train, args=SFTConfig(
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, warmup_steps=max(1, args.steps // 20), lr_scheduler_type="cosine",
        weight_decay=0.0, logging_steps=10, output_dir=args.output, seed=0))
    result = trainer.train()
    model = trainer.model
    print(f"trained {result.global_step} steps in {result.metrics['train_runtime']:.0f} s, "
          f"last loss {trainer.log_history[-1]['loss']:.3f}")
    print(f"held-out accuracy after training:  {accuracy(model, processor, held_out):.1%}")
    adapter = os.path.join(args.output, "adapter")
    model.save_pretrained(adapter, processor)
    print(f"wrote {adapter} and {os.path.join(args.output, 'loss.png')}")


if __name__ == "__main__":
    main()
