"""`import jaxvlm` turns on JAX's persistent compilation cache (jaxvlm.compilation_cache): a second process running
the same training step loads every program from the cache instead of compiling it; JAXVLM_COMPILATION_CACHE=0 and a
cache directory the user gave JAX win over the default. (The rest of the suite shares one cache directory of its own:
conftest.)"""
import json
import os
import subprocess
import sys

from tests.conftest import REPO

# A few NF4 + LoRA training steps of a tiny model; prints the cache directory in use and JAX's cache events.
SCRIPT = r"""
import json, sys
import threading
import jax, jax.monitoring
events, lock = {"hits": 0, "misses": 0}, threading.Lock()
def count(name, **kw):  # the importer's loader threads compile too: counted under a lock
    with lock:
        if name == "/jax/compilation_cache/cache_hits": events["hits"] += 1
        if name == "/jax/compilation_cache/cache_misses": events["misses"] += 1
jax.monitoring.register_event_listener(count)
import jaxvlm
if len(sys.argv) < 3:  # only where the cache is, and which programs it keeps
    print(json.dumps({"dir": jax.config.jax_compilation_cache_dir,
                      "min_secs": jax.config.jax_persistent_cache_min_compile_time_secs})); sys.exit()
from jaxvlm import FastVisionModel
from jaxvlm.train import VisionDataCollator
from jaxvlm.train.trainer import SFTConfig, SFTTrainer
from tests.multidevice import records
model, processor = FastVisionModel.from_pretrained(sys.argv[1], load_in_4bit=True, dtype="float32")
model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
args = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=2, optim="adamw_torch",
                 output_dir=sys.argv[2], logging_steps=0, seed=0)
SFTTrainer(model, processor, VisionDataCollator(model, processor), records(4), args=args).train()
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, **events}))
"""


def run(env, *args):
    result = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_second_run_loads_its_programs_from_the_cache(tmp_path, monkeypatch):
    from jaxvlm.tiny import save_random_model
    model_dir = str(tmp_path / "model")
    save_random_model(model_dir, "qwen2_vl")
    cache = tmp_path / "cache"
    # Every program cached however fast it compiled (JAX's default keeps those over 1 s; jaxvlm's keeps all).
    env = {"JAXVLM_COMPILATION_CACHE": str(cache)}
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)  # conftest's, for the rest
    assert run(env) == {"dir": str(cache), "min_secs": 0.0}
    first = run(env, model_dir, tmp_path / "a")
    assert first["dir"] == str(cache) and first["misses"] > 0 and first["hits"] == 0, first
    entries = set(os.listdir(cache))
    assert entries
    second = run(env, model_dir, tmp_path / "b")
    # Every program looked up is found, every cached one is looked up, and nothing is compiled anew. (Not hits ==
    # first misses: two loader threads that need the same program at once may both look it up, in either run.)
    programs = len([e for e in entries if not e.endswith(("-atime", ".lockfile"))])  # JAX's LRU cache: 2 files each
    assert second["misses"] == 0 and second["hits"] >= programs and first["misses"] >= programs, (
        first, second, programs)
    assert set(os.listdir(cache)) == entries

    # Off, the user's own directory, and one that cannot be written (a warning, no cache, no failure).
    assert run({"JAXVLM_COMPILATION_CACHE": "0"})["dir"] is None
    assert run({"JAXVLM_COMPILATION_CACHE": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "2"}) == {
        "dir": str(cache), "min_secs": 2.0}  # the user's threshold wins
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert run({"JAXVLM_COMPILATION_CACHE": str(blocked / "cache")})["dir"] is None
    own = str(tmp_path / "own")
    assert run({"JAX_COMPILATION_CACHE_DIR": own, "JAXVLM_COMPILATION_CACHE": str(cache)})["dir"] == own
