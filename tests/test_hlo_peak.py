"""scripts/hlo_peak.py against a program whose peak is known: a scan that keeps each step's f32[1024, 1024] for the
backward. Its replay of XLA's heap simulation must give the temp bytes XLA reports and name the buffers."""
import glob
import os
import subprocess
import sys

import pytest

from scripts import hlo_peak
from tests.conftest import REPO

PROGRAM = """
import jax, jax.numpy as jnp
def peaky(x, ws):
    def body(c, w):
        h = jnp.exp(c[:, None] * w[None, :])  # f32[1024, 1024], saved per step for the backward
        return jnp.tanh(h @ c) + (h * h).sum(axis=1), None
    return jax.lax.scan(body, x, ws)[0].sum()
compiled = jax.jit(jax.grad(peaky)).lower(jnp.ones(1024), jnp.ones((STEPS, 1024))).compile()
print(compiled.memory_analysis().temp_size_in_bytes)
"""


def compile_and_dump(out, steps: int) -> int:
    flags = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={out} --xla_dump_hlo_as_proto "
             "--xla_dump_hlo_module_re=.*peaky.*")
    result = subprocess.run([sys.executable, "-c", f"STEPS = {steps}" + PROGRAM], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1])


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    return out, compile_and_dump(out, 3)


def test_the_replayed_peak_is_xlas_temp_size_and_names_its_buffers(dump, tmp_path):
    out, temp_bytes = dump
    args = [str(out), "--module", "peaky", "--top", "5", "--json", str(tmp_path / "peak.json")]
    reports = hlo_peak.main(args)["reports"]
    assert len(reports) == 1 and (tmp_path / "peak.json").exists()
    report = reports[0]
    # XLA's temp allocation is the simulated peak rounded up to its alignment.
    assert temp_bytes - 1024 <= report["peak_bytes"] <= temp_bytes, (report["peak_bytes"], temp_bytes)
    top = report["top"]
    assert top[0]["shape"] == "f32[3,1024,1024]" and top[0]["bytes"] == 3 * 2 ** 22  # the scan's saved h
    assert any(b["shape"] == "f32[1024,1024]" and b["op_name"].endswith("/exp") for b in top), top


def test_a_proto_without_a_buffer_assignment_is_refused(dump):
    before = glob.glob(os.path.join(dump[0], "*peaky.before_optimizations.hlo.pb"))
    assert before
    with pytest.raises(ValueError, match="before_optimizations.hlo.pb: not an HloProto with a buffer assignment"):
        hlo_peak.read(before[0])
    with pytest.raises(FileNotFoundError, match="--xla_dump_hlo_as_proto"):
        hlo_peak.find(str(dump[0]), "no-such-module")


def test_against_a_second_program_names_what_differs_at_the_peaks(dump, tmp_path):
    """A scan of 4 steps against the one of 3: at the peaks only the saved stacks differ."""
    other = tmp_path / "four"
    compile_and_dump(other, 4)
    out = hlo_peak.main([str(other), "--module", "peaky", "--against", str(dump[0])])["against"]
    here = {(b["shape"], b["bytes"]) for b in out["only_here"]}
    there = {(b["shape"], b["bytes"]) for b in out["only_there"]}
    assert ("f32[4,1024,1024]", 4 * 2 ** 22) in here and ("f32[3,1024,1024]", 3 * 2 ** 22) in there, out
    assert out["only_here_bytes"] - out["only_there_bytes"] >= 2 ** 22


def test_explain_traces_a_buffer_at_the_peak_to_its_instruction(dump):
    """--explain on the peak's largest buffer (the scan's saved h): the instruction that writes it, with its shape,
    operands or fused instructions, and its users; an unknown name is an error naming it."""
    out = hlo_peak.main([str(dump[0]), "--module", "peaky", "--top", "1"])
    name = out["reports"][0]["top"][0]["instruction"]
    explained = hlo_peak.main([str(dump[0]), "--module", "peaky", "--top", "1", "--explain", name])["explained"][name]
    assert explained["line"].startswith(f"{name} = ") and "f32[3,1024,1024]" in explained["line"], explained
    assert explained["users"] and (explained["operands"] or explained["fused"]), explained
    with pytest.raises(KeyError, match="no-such-instruction"):
        hlo_peak.main([str(dump[0]), "--module", "peaky", "--explain", "no-such-instruction"])
