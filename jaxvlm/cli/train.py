"""jaxvlm-train: LoRA fine-tuning of a VLM on image+text conversations.

    jaxvlm-train --model Qwen/Qwen2-VL-2B-Instruct --data train.jsonl --output out/
    jaxvlm-train --model DIR --data train.jsonl --output out/ --max-steps 200 --batch-size 4 \\
        --grad-accum 4 --lr 2e-4 --rank 16 --train-on-responses-only --save-steps 50
    jaxvlm-train ... --resume                # continue from the newest out/checkpoint-N
    jaxvlm-train ... --overwrite             # start again in an out/ that holds an earlier run

The data: a JSONL file, one record per line, in the chat "messages" format; image paths are relative to
the JSONL file:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/1.png"},
                                               {"type": "text", "text": "What is written here?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]}

Writes out/adapter (a PEFT adapter dir with the processor), out/loss.png, out/log_history.json and, with
--save-steps, out/checkpoint-N (orbax) for --resume. An out/ that holds an earlier run's adapter or
checkpoints is refused unless --resume or --overwrite says what to do with them.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

from jaxvlm.cli.common import add_debug_option, run_tool


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="jaxvlm-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory or hub id")
    ap.add_argument("--data", required=True, help="training records (JSONL)")
    ap.add_argument("--output", required=True, help="output directory")
    g = ap.add_argument_group("model")
    g.add_argument("--dtype", default=None, help="bfloat16 (default), float16 or float32")
    g.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (QLoRA)")
    g.add_argument("--max-seq-length", type=int, default=2048)
    g.add_argument("--gradient-checkpointing", default="unsloth",
                   help="unsloth (host offload), true, attention, dots, or false")
    g = ap.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--alpha", type=int, default=16)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--no-vision", action="store_true", help="do not adapt the vision tower")
    g.add_argument("--no-language", action="store_true", help="do not adapt the language model")
    g.add_argument("--target-modules", default=None, help="a regex, or all-linear (default: Unsloth's choice)")
    g = ap.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=2,
                   help="samples per data-parallel rank (per data x fsdp coordinate of the mesh), as HF's "
                        "per_device_train_batch_size")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; left out: 1); default: every "
                        "device on fsdp")
    g.add_argument("--grad-accum", type=int, default=4)
    g.add_argument("--max-steps", type=int, default=-1)
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--warmup-steps", type=int, default=5)
    g.add_argument("--scheduler", default="linear", choices=["linear", "cosine", "constant", "constant_with_warmup"])
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--optim", default="adamw_8bit", help="adamw_8bit (8-bit blockwise moments, as bitsandbytes AdamW8bit) or adamw_torch (fp32)")
    g.add_argument("--seed", type=int, default=3407)
    g.add_argument("--train-on-responses-only", action="store_true")
    g.add_argument("--instruction-part", default=None,
                   help="the text that starts a user turn (default: the model family's chat marker)")
    g.add_argument("--response-part", default=None,
                   help="the text that starts an assistant turn (default: the model family's chat marker)")
    g.add_argument("--logging-steps", type=int, default=1)
    g.add_argument("--save-steps", type=int, default=0)
    earlier = g.add_mutually_exclusive_group()
    earlier.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --output")
    earlier.add_argument("--overwrite", action="store_true",
                         help="start again in an --output that holds an earlier run: its checkpoint-N dirs are "
                              "deleted and its adapter replaced; other files are left alone")
    add_debug_option(ap)
    return ap.parse_args(argv)


def _checkpointing(value: str):
    return {"true": True, "false": False}.get(value.lower(), value)


def checkpoint_dirs(output: str) -> list[str]:
    """The checkpoint-N directories in `output` (none if it does not exist)."""
    if not os.path.isdir(output):
        return []
    return [os.path.join(output, d) for d in sorted(os.listdir(output))
            if re.fullmatch(r"checkpoint-\d+", d) and os.path.isdir(os.path.join(output, d))]


def check_output(args) -> None:
    """Raises if --output holds an earlier run that neither --resume nor --overwrite accounts for."""
    out = args.output
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--output {out}: exists and is not a directory")
    checkpoints = checkpoint_dirs(out)
    if args.resume and not checkpoints:
        raise FileNotFoundError(f"--resume: {out} has no checkpoint-N directory to resume from "
                                f"(an earlier run writes them with --save-steps)")
    if args.resume or args.overwrite:
        return
    if checkpoints:
        raise FileExistsError(f"{out} has checkpoints from an earlier run: pass --resume to continue it "
                              f"or --overwrite to start again")
    if os.path.exists(os.path.join(out, "adapter")):
        raise FileExistsError(f"{os.path.join(out, 'adapter')} is from an earlier run: pass --overwrite to "
                              f"replace it")


def main(argv=None) -> int:
    return run_tool("jaxvlm-train", train, parse_args(argv))


def train(args) -> int:
    check_output(args)
    from jaxvlm import FastVisionModel
    from jaxvlm.train import VisionDataCollator, load_jsonl
    from jaxvlm.train.trainer import SFTConfig, SFTTrainer

    records = load_jsonl(args.data)
    model, processor = FastVisionModel.from_pretrained(
        args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit, max_seq_length=args.max_seq_length,
        use_gradient_checkpointing=_checkpointing(args.gradient_checkpointing))
    model = FastVisionModel.get_peft_model(
        model, r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=args.target_modules,
        finetune_vision_layers=not args.no_vision, finetune_language_layers=not args.no_language,
        random_state=args.seed)
    FastVisionModel.for_training(model)
    collator = VisionDataCollator(model, processor, train_on_responses_only=args.train_on_responses_only,
                                  instruction_part=args.instruction_part, response_part=args.response_part)
    if args.overwrite:
        for path in checkpoint_dirs(args.output):  # else a later --resume would pick up the earlier run's
            shutil.rmtree(path)
    os.makedirs(args.output, exist_ok=True)
    trainer = SFTTrainer(model, processor, collator, records, args=SFTConfig(
        output_dir=args.output, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps, num_train_epochs=args.epochs,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, lr_scheduler_type=args.scheduler,
        weight_decay=args.weight_decay, optim=args.optim, seed=args.seed, logging_steps=args.logging_steps,
        save_steps=args.save_steps, mesh=args.mesh))
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    adapter = os.path.join(args.output, "adapter")
    trainer.model.save_pretrained(adapter, processor, overwrite=True)
    print(f"trained {result.global_step} steps; mean loss {result.training_loss:.4f}; adapter in {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
