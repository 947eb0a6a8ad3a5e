"""Reading a checkpoint into host arrays, then onto the device (start-up time, issue 19).

    PYTHONPATH=. python -m scripts.bench_read /tmp/q2b      # a checkpoint scripts/bench_load.py wrote

Reading: the per-layer tensors stacked, by `np.stack` over the safetensors memory map (the importer's way before
2026-11-30) vs `Checkpoint.read` (plain reads on a thread pool), twice each, in this order. Run it after dropping the
page cache (`echo 3 > /proc/sys/vm/drop_caches`) for a first read from disk; the second round reads from the page
cache.

Host to device, each way over the stacked arrays (every tensor of the checkpoint, the layers stacked as the importer
stacks them) read afresh, then each way again over one set of arrays sent before; seconds and GB/s until the last
array is on the device: `serial` (device_put one array after
another, as the importer does, waiting for none), `blocking` (waiting for each), `list` (one device_put of them all),
`threads` (device_put on 8 threads), `pinned` (each array first into pinned host memory, then onto the device).
"""
from __future__ import annotations

import concurrent.futures
import sys
import time

import numpy as np

from converters.safetensors_io import Checkpoint


def stacked_groups(c: Checkpoint) -> list[list[str]]:
    groups = {}
    for k in c.keys():
        if ".layers." in k:
            head, rest = k.split(".layers.", 1)
            groups.setdefault((head, rest.split(".", 1)[1]), []).append(k)
        else:
            groups[(k, "")] = [k]
    return list(groups.values())


def to_device(arrays: list[np.ndarray], how: str) -> None:
    import jax
    device = jax.devices()[0]
    if how == "serial":
        out = [jax.device_put(a, device) for a in arrays]
    elif how == "blocking":
        out = [jax.block_until_ready(jax.device_put(a, device)) for a in arrays]
    elif how == "list":
        out = jax.device_put(arrays, device)
    elif how == "threads":
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            out = list(pool.map(lambda a: jax.device_put(a, device), arrays))
    elif how == "pinned":
        pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
        on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
        out = [jax.device_put(jax.device_put(a, pinned), on_device) for a in arrays]
    else:
        raise ValueError(how)
    jax.block_until_ready(out)
    del out


def main():
    c = Checkpoint(sys.argv[1])
    groups = [ks for ks in stacked_groups(c) if len(ks) > 1]
    for _ in range(2):
        t = time.perf_counter()
        n = sum(np.stack([c.get(k) for k in ks]).nbytes for ks in groups)
        t1 = time.perf_counter()
        sum(c.read(ks).nbytes for ks in groups)
        t2 = time.perf_counter()
        print(f"{n / 1e9:.2f} GB stacked: np.stack over the map {t1 - t:.2f} s, Checkpoint.read {t2 - t1:.2f} s",
              flush=True)
    to_device([c.read(stacked_groups(c)[0])], "serial")  # the backend up
    for fresh in (True, False):
        arrays = [c.read(ks) for ks in stacked_groups(c)]
        n = sum(a.nbytes for a in arrays)
        for how in ("serial", "blocking", "list", "threads", "pinned"):
            if fresh:  # host memory never sent before, as the importer's (a buffer sent once goes faster after)
                arrays = [c.read(ks) for ks in stacked_groups(c)]
            t = time.perf_counter()
            try:
                to_device(arrays, how)
            except Exception as e:  # a way this backend lacks is a result too
                print(f"host to device, {how}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            s = time.perf_counter() - t
            print(f"host to device, {how}, {'fresh' if fresh else 'sent before'}: {len(arrays)} arrays, {n / 1e9:.2f} GB "
                  f"in {s:.2f} s = {n / 1e9 / s:.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()
