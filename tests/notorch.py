"""Run Python code in a subprocess where torch and torchvision look uninstalled.

The finder below replaces the standard PathFinder and reports "no such module" for torch, torchvision
and their submodules, and no installed distribution under those names. Raising ImportError from a finder
placed ahead of PathFinder would not do: transformers probes for torch with importlib.util.find_spec,
which passes the error on instead of answering "not installed", so nothing would import at all.
"""
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = ("torch", "torchvision")

_HIDE_TORCH = f"""
import sys
from importlib.machinery import PathFinder

class _HideTorch(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in {HIDDEN!r}:
            return None
        return super().find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return (d for d in super().find_distributions(*args, **kwargs)
                if (d.metadata["Name"] or "").lower() not in {HIDDEN!r})

sys.meta_path[:] = [_HideTorch if finder is PathFinder else finder for finder in sys.meta_path]
del _HideTorch, PathFinder
"""


def run_without_torch(code: str, timeout: float = 120, binary: bool = False):
    """Runs `code` with `python -c` from the repo root, torch and torchvision hidden; returns its stdout
    (bytes if `binary`, else text).

    Raises AssertionError carrying the subprocess's stderr if it exits non-zero.
    """
    result = subprocess.run([sys.executable, "-c", _HIDE_TORCH + code], cwd=REPO_ROOT, capture_output=True,
                            text=not binary, timeout=timeout)
    if result.returncode != 0:
        stderr = result.stderr if not binary else result.stderr.decode(errors="replace")
        raise AssertionError(f"code without torch exited with {result.returncode}:\n{stderr}")
    return result.stdout
