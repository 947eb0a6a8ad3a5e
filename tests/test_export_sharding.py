"""Exports from a model sharded over a device mesh: a tiny Qwen2-VL in NF4 with r=8 LoRA (random nonzero lora_B)
is exported from one device and sharded on fsdp=4 x tensor=2, in one subprocess with 8 forced CPU devices
(tests/multidevice_export.py). The merged 16-bit, merged 4-bit and adapter directories of the sharded model are
byte for byte those of the one-device model, and every array the sharded exports bring to the host is one layer's
tensor: never a whole stacked param."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tests.conftest import multidevice_env

REPO = Path(__file__).resolve().parent.parent
METHODS = ("merged_16bit", "merged_4bit", "lora")
WEIGHTS = {"merged_16bit": "model.safetensors", "merged_4bit": "model.safetensors",
           "lora": "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(output directory holding one/<method> and mesh/<method>, the subprocess's JSON line)."""
    from jaxvlm.tiny import save_random_model
    model_dir = tmp_path_factory.mktemp("model")
    save_random_model(str(model_dir), "qwen2_vl")
    out = tmp_path_factory.mktemp("exports")
    env = multidevice_env(8)
    result = subprocess.run([sys.executable, "-m", "tests.multidevice_export", str(model_dir), str(out)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [json.loads(s) for s in result.stdout.splitlines() if s.startswith("{")]
    return out, line


def test_the_model_was_sharded(exports):
    _, line = exports
    assert line["split_leaves"] > 30


@pytest.mark.parametrize("method", METHODS)
def test_sharded_export_is_the_one_device_export(exports, method):
    out, _ = exports
    one, mesh = out / "one" / method, out / "mesh" / method
    assert sorted(os.listdir(mesh)) == sorted(os.listdir(one))
    ours, reference = load_file(str(mesh / WEIGHTS[method])), load_file(str(one / WEIGHTS[method]))
    assert list(ours) == list(reference)
    for key, array in reference.items():
        assert ours[key].dtype == array.dtype and ours[key].shape == array.shape, key
        np.testing.assert_array_equal(ours[key], array, err_msg=key)
    for name in os.listdir(one):
        assert (mesh / name).read_bytes() == (one / name).read_bytes(), name
    if method == "lora":
        assert any(np.abs(a).max() > 0 for k, a in reference.items() if "lora_B" in k)


@pytest.mark.parametrize("method", METHODS)
def test_each_array_brought_to_the_host_is_one_layer_tensor(exports, method):
    """The sharded export gathers the tensors it writes one by one (the merged exports: the 16-bit tensors, which the
    4-bit export then quantizes on the host), plus, for the adapter, each LoRA's [layers] mask; never a stacked
    param ([layers, ...])."""
    out, line = exports
    gathered = sorted(map(tuple, line["gathered"][method]))
    written = load_file(str(out / "mesh" / ("lora" if method == "lora" else "merged_16bit") / WEIGHTS[method]))
    expected = sorted(a.shape for a in written.values())
    if method == "lora":
        masks = [s for s in gathered if len(s) == 1 and s[0] in line["layers"]]
        assert masks
        gathered = [s for s in gathered if s not in masks]
    assert gathered == expected
