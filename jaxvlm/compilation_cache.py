"""JAX's persistent compilation cache, on by default: a second run of the same training or generation loads its
compiled programs from disk instead of compiling them again (XLA's compile is most of a run's start-up).

`import jaxvlm` turns it on at `$JAXVLM_COMPILATION_CACHE`, else `$XDG_CACHE_HOME/jaxvlm/xla` (`~/.cache/jaxvlm/xla`),
unless JAX already has a cache directory (`JAX_COMPILATION_CACHE_DIR` or `jax.config`'s `jax_compilation_cache_dir`:
the user's wins) or `JAXVLM_COMPILATION_CACHE=0`. JAX keys each entry by the program, the devices and the jax/jaxlib
versions, so a stale entry is never used. JAX keeps only programs whose compile took at least
`jax_persistent_cache_min_compile_time_secs` (1 s by default); jaxvlm sets it to 0 where the user has not set it: the
two dozen small programs of a training run's start (LoRA's factors, the optimizer's state, ...) took 1.3 s to compile
again in every warm start of the Qwen2-VL-2B geometry on an H200 (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import os
import warnings

import jax

ENV = "JAXVLM_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxvlm", "xla")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache at `path` (None: as the module docstring says); returns the
    directory in use, or None when it is off. Call it before the first compile (`import jaxvlm` does)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    setting = os.environ.get(ENV, "")
    if path is None and setting.lower() in _OFF:
        return None
    path = path or setting or default_dir()
    try:  # JAX would raise at the first compile on a directory it cannot create
        os.makedirs(path, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        warnings.warn(f"compilation cache: {path} cannot be written, so compiled programs are not kept; set "
                      f"{ENV} to a writable directory (or 0 to silence this)", UserWarning, stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ and \
            jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default: the user's setting wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
