import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's processes (the multi-device runs and CLIs start many, compiling many of the same programs) share one
# persistent compilation cache under the temp dir, kept to 2 GB (least recently used entries go first).
# tests/test_compilation_cache.py gives its own processes their own.
os.environ.setdefault("JAXVLM_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), f"jaxvlm-tests-xla-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))
# XLA's CPU backend compiles at LLVM -O0 (measured: a tiny model's training step compiles in 6 s instead of 15 s, and
# compiling is most of the suite's time; the tiny programs run about as fast). Every process of the suite compiles
# alike, so one-device and mesh runs still compare programs built the same way.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import numpy as np
import pytest
from PIL import Image

from tests.tiny import build_hf_model, save_tiny_processor

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
# The longest files (minutes each), run first: the test command spreads whole files over two processes
# (pytest-xdist --dist loadfile, in collection order), and a long file taken last would run on alone at the end.
LONGEST_FIRST = ("test_sharding.py", "test_family_sharding.py", "test_multihost.py", "test_llava.py", "test_gemma3.py",
                 "test_qwen3_vl_moe.py", "test_trainer.py")


def pytest_configure(config):
    # pytest-xdist otherwise hands out loadfile scopes largest-first by test count, not in LONGEST_FIRST's order.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


def save_tiny_model(path, family, **text_overrides):
    """Saves a tiny random transformers model of `family` and its processor into `path`; returns the model."""
    model = build_hf_model(family, **text_overrides)
    model.save_pretrained(path)
    save_tiny_processor(path, family)
    return model


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, model dir, transformers model) for each family, saved once per session."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, str(path), save_tiny_model(path, request.param)


@pytest.fixture
def decode_kernel_calls(monkeypatch):
    """The decode-attention kernel on (Pallas' interpreter) for one test; yields the list of the layers it was called
    for (and as its `slots`, the slots of the cache of each call; as `read`, the layers of its read-only calls). The
    setting is read at trace time, so the jit caches are cleared on the way in (a program traced with the kernel off
    would be reused) and on the way out (and one traced with it on)."""
    import jax

    from jaxvlm import layers
    from jaxvlm.kernels import decode_attention

    class Calls(list):
        slots: list  # the slots of each call's cache, in the same order
        read: list  # the layers of the calls that read a cache without writing a step (`attend`)

    calls = Calls()
    calls.slots, calls.read = [], []
    kernel, reader = decode_attention.decode_attention, decode_attention.attend

    def counted(*args, **kwargs):
        calls.append(args[5])  # the layer
        calls.slots.append(args[3].shape[-3])
        return kernel(*args, **kwargs)

    def read(*args, **kwargs):
        calls.read.append(args[3])
        return reader(*args, **kwargs)
    monkeypatch.setattr(layers, "decode_attention_kernel", "interpret")
    monkeypatch.setattr(decode_attention, "decode_attention", counted)
    monkeypatch.setattr(decode_attention, "attend", read)
    jax.clear_caches()
    yield calls
    jax.clear_caches()


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat(text, n_images=0):
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def multidevice_env(devices: int) -> dict:
    """The environment of a test subprocess with `devices` forced CPU devices. XLA's CPU client sizes its thread pool
    by the core count (NPROC overrides it), at least one thread per device, and its thunk executor runs independent
    collectives of one program at once: on 2 cores the 8 threads could all wait in collectives while one device had
    no thread to reach them (a deadlock seen in CI). 4 threads per device leave room; the collective timeouts (40 s by
    default) allow for a loaded machine and still end a real hang."""
    flags = (f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices} "
             "--xla_cpu_collective_call_terminate_timeout_seconds=300 --xla_cpu_collective_timeout_seconds=300")
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "NPROC": str(4 * devices),
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def multidevice(tmp_path_factory):
    """Runs tests/multidevice.py with 8 CPU devices; returns a function of its arguments -> its JSON lines."""
    from jaxvlm.tiny import save_random_model
    model_dir = tmp_path_factory.mktemp("model")
    save_random_model(str(model_dir), "qwen2_vl")
    env = multidevice_env(8)

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "tests.multidevice", str(model_dir), *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, out.stderr[-3000:]
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return run, str(model_dir), env
