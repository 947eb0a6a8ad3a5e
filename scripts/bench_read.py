"""Reading a checkpoint's per-layer tensors into stacked host arrays: `np.stack` over the safetensors memory map (the
importer's way before 2026-11-30) vs `Checkpoint.read` (plain reads on a thread pool), twice each, in this order.

    PYTHONPATH=. python -m scripts.bench_read /tmp/q2b      # a checkpoint scripts/bench_load.py wrote

Run it after dropping the page cache (`echo 3 > /proc/sys/vm/drop_caches`) for a first read from disk; the second
round reads from the page cache.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from converters.safetensors_io import Checkpoint


def main():
    c = Checkpoint(sys.argv[1])
    groups = {}
    for k in c.keys():
        if ".layers." in k:
            head, rest = k.split(".layers.", 1)
            groups.setdefault((head, rest.split(".", 1)[1]), []).append(k)
    for _ in range(2):
        t = time.perf_counter()
        n = sum(np.stack([c.get(k) for k in ks]).nbytes for ks in groups.values())
        t1 = time.perf_counter()
        sum(c.read(ks).nbytes for ks in groups.values())
        t2 = time.perf_counter()
        print(f"{n / 1e9:.2f} GB stacked: np.stack over the map {t1 - t:.2f} s, Checkpoint.read {t2 - t1:.2f} s",
              flush=True)


if __name__ == "__main__":
    main()
