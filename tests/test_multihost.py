"""Several hosts on one machine (tests/multidevice.py in two processes that join through jax.distributed): they
train on one mesh of 8 CPU devices with the single-device losses and resume from the checkpoint they wrote."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import multidevice_env

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_train_together_and_resume_from_the_checkpoint_they_wrote(multidevice, tmp_path):
    """Several hosts on one machine: two processes of 4 CPU devices each join through jax.distributed
    (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, gloo collectives) into one mesh of 8, train with the
    single-device losses, each writing its own checkpoint shards, then resume from them on another mesh."""
    _, model_dir, _ = multidevice
    env = {**multidevice_env(4), "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "2"}

    def run_two(*args):
        procs = [subprocess.Popen([sys.executable, "-m", "tests.multidevice", model_dir, *args], cwd=REPO,
                                  env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=1200) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        return [json.loads(next(line for line in out.splitlines() if line.startswith("{"))) for out, _ in outs]

    run, _, _ = multidevice
    (one,) = run("--mesh", "one", "--out", str(tmp_path / "one"))
    first = run_two("--mesh", "data=2,fsdp=4", "--save-steps", "3", "--out", str(tmp_path / "a"))
    assert [(r["process"], r["processes"], r["devices"]) for r in first] == [(0, 2, 8), (1, 2, 8)]
    for r in first:
        np.testing.assert_allclose(r["losses"], one["losses"], rtol=1e-5)
        # Several processes agree on their shards' padding with device collectives: made in step order on the loop's
        # thread, not ahead on another.
        assert r["made_on"] == ["MainThread"] * 5, r["made_on"]
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / "ocdbt.process_0").is_dir() and (ckpt / "ocdbt.process_1").is_dir()  # each wrote its shards
    env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{_free_port()}"
    resumed = run_two("--mesh", "fsdp=4,tensor=2", "--resume", str(ckpt), "--out", str(tmp_path / "b"))
    for r in resumed:
        assert r["steps"] == [4, 5]
        np.testing.assert_allclose(r["losses"], one["losses"][3:], rtol=1e-5)
