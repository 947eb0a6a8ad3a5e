"""Start-up time to the first training step: cold (empty compilation cache) and warm (the same command again, its
compiled programs loaded from jaxvlm's persistent compilation cache). On the lent GPU machine:

    PYTHONPATH=. python -m scripts.bench_start --dir /tmp/qwen2vl-2b-random --weights bf16 nf4 --batch 4

Writes a random-weight Qwen2-VL-2B checkpoint in transformers' layout there first (scripts/bench_load.py), unless
one is there. Then, per weights kind, a fresh empty cache directory (JAXVLM_COMPILATION_CACHE) and two fresh
processes in turn, each doing what a user's training script does: `import jaxvlm`, `from_pretrained`, `get_peft_model`
(Unsloth's defaults, r=16), `for_training`, and one SFTTrainer step (bench_train's synthetic batch: one 448x448 image +
256 text tokens per sample). One JSON line per process: seconds from the process's start to `import jaxvlm` done, to
the model ready, to the first step's loss read back (`first_step_s`: the step's compile, or its cache load,
included) and to train() returning (`train_returned_s`: the run's files written), and the cache's entries after it.
`--tiny` runs the family's tiny config on the CPU (a check of the script, not a measurement).
"""
from __future__ import annotations

import time

T0 = time.time()  # before any heavy import: the child's clock starts with the process

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


def first_step(path: str, weights: str, batch: int, text: int, tiny: bool) -> dict:
    import jaxvlm  # noqa: F401  (turns the compilation cache on)
    t_import = time.time()
    import jax

    from jaxvlm import FastVisionModel
    stages = stamp_stages()
    from scripts.bench_common import workload_image
    from scripts.bench_train import synthetic_trainer
    model, _ = FastVisionModel.from_pretrained(path, load_in_4bit=weights == "nf4", load_in_16bit=weights == "bf16")
    jax.block_until_ready(jax.tree.leaves(model))
    t_loaded = time.time()
    model = FastVisionModel.get_peft_model(model, r=16, lora_alpha=16)
    FastVisionModel.for_training(model)
    jax.block_until_ready(jax.tree.leaves(model))
    t_model = time.time()
    cfg = model.config
    trainer, seq = synthetic_trainer(model, cfg, batch, text, workload_image(cfg, tiny))
    tr = trainer(1)
    tr.log_history = Stamped()
    out = tr.train()
    return dict(import_s=round(t_import - T0, 2), **stages, loaded_s=round(t_loaded - T0, 2),
                model_s=round(t_model - T0, 2), first_step_s=round(tr.log_history.first - T0, 2),
                train_returned_s=round(time.time() - T0, 2), loss=round(out.training_loss, 4), seq=seq,
                torch_imported="torch" in sys.modules and sys.modules["torch"] is not None,
                device=jax.devices()[0].device_kind)


def stamp_stages() -> dict:
    """from_pretrained's stages stamped as they end (seconds from the process's start, into the dict returned):
    config_s (config.json read through transformers' AutoConfig: transformers' import), weights_s (every param on the
    device), processor_s (the processor, loaded on a thread beside the weights)."""
    import jaxvlm.fast_vision_model as fvm
    stages = {}

    def stamped(name, fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            stages[name] = round(time.time() - T0, 2)
            return out
        return call
    fvm.read_config = stamped("config_s", fvm.read_config)
    fvm.load_state = stamped("weights_s", fvm.load_state)
    fvm._load_processor = stamped("processor_s", fvm._load_processor)
    return stages


class Stamped(list):
    """The trainer's log_history, noting when the first step's record (its loss read back) arrives: train() goes on
    to write the run's files (the loss plot: matplotlib's import and first text layout, seconds)."""
    first = None

    def append(self, record):
        self.first = self.first or time.time()
        super().append(record)


def cache_entries(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/qwen2vl-2b-random", help="the checkpoint (written there if absent)")
    ap.add_argument("--weights", nargs="+", default=["bf16"], choices=["bf16", "nf4"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="the tiny Qwen2-VL on the CPU (checks the script)")
    ap.add_argument("--cache", help="the compilation cache directory (default: a new one per weights kind); it must "
                                    "be empty for the first run to be cold")
    ap.add_argument("--no-torch", action="store_true",
                    help="start as on a machine without PyTorch (jaxvlm does not need it; transformers imports it "
                         "where installed): the processes see no torch package")
    ap.add_argument("--pycache", help="a directory for Python's bytecode (PYTHONPYCACHEPREFIX) shared by the runs: "
                                      "the warm run finds the modules compiled, as a pip-installed package has them "
                                      "where site-packages cannot be written")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # (internal) weights kind: one start in this process
    args = ap.parse_args()
    if args.one:
        if args.no_torch:
            sys.modules["torch"] = None  # importlib.util.find_spec("torch") is then None: transformers sees no torch
        profile = os.environ.get("BENCH_START_PROFILE")  # (a file) the process's time by function, cProfile's text
        if profile:
            import cProfile
            import io
            import pstats
            prof = cProfile.Profile()
            line = prof.runcall(first_step, args.dir, args.one, args.batch, args.text, args.tiny)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(100)
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
            with open(profile, "w") as f:
                f.write(text.getvalue())
        else:
            line = first_step(args.dir, args.one, args.batch, args.text, args.tiny)
        print(json.dumps(line), flush=True)
        return
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        if args.tiny:
            from jaxvlm.tiny import save_random_model
            save_random_model(args.dir, "qwen2_vl")
        else:
            from scripts.bench_load import write_checkpoint
            write_checkpoint(args.dir)
    for weights in args.weights:
        cache = os.path.join(args.cache, weights) if args.cache else tempfile.mkdtemp(prefix="jaxvlm-start-cache-")
        if os.path.exists(cache) and os.listdir(cache):
            raise SystemExit(f"--cache: {cache} is not empty, so the first run would not be cold")
        for run in ("cold", "warm"):
            env = dict(os.environ, JAXVLM_COMPILATION_CACHE=cache)
            env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a directory given to JAX would win over ours
            if args.pycache:
                env["PYTHONPYCACHEPREFIX"] = args.pycache
                env.pop("PYTHONDONTWRITEBYTECODE", None)
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "scripts.bench_start", "--one", weights, "--dir", args.dir,
                                "--batch", str(args.batch), "--text", str(args.text),
                                *(["--tiny"] if args.tiny else []), *(["--no-torch"] if args.no_torch else [])],
                               env=env,
                               capture_output=True, text=True)
            line = dict(bench="start", run=run, geometry="tiny" if args.tiny else "qwen2-vl-2b", weights=weights,
                        batch=args.batch, no_torch=args.no_torch, pycache=bool(args.pycache),
                        process_s=round(time.time() - t0, 2))
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                line["error"] = f"exit {r.returncode}"
            else:
                line.update(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(dict(line, cache_entries=cache_entries(cache))), flush=True)


if __name__ == "__main__":
    main()
