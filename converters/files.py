"""Saving into a directory safely: files are written into a staging directory beside it, then moved in.

Saving into an existing directory replaces only the files being written (as transformers' and PEFT's
save_pretrained do) and never deletes anything else; a failure leaves the directory as it was (and
creates nothing). Directories and files get the user's umask (tempfile's would be 0700 / 0600).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_directory(out_dir: str):
    """Yields a fresh staging directory; when the block succeeds, each file in it replaces the file of
    the same relative path in `out_dir` (created with its parents if absent).

    Raises NotADirectoryError, before anything is written, when `out_dir` is an existing file.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} exists and is not a directory: cannot save into it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.staging-", dir=parent)
    try:
        yield stage
        umask = _umask()
        os.makedirs(out_dir, mode=0o777, exist_ok=True)
        for root, _, files in os.walk(stage):
            rel = os.path.relpath(root, stage)
            dest = os.path.normpath(os.path.join(out_dir, rel))
            os.makedirs(dest, exist_ok=True)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
                os.replace(os.path.join(root, name), os.path.join(dest, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
