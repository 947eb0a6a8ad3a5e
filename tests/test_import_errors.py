"""Bad checkpoints and configs give an exception naming what is wrong, never a partial model."""
import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxvlm.converters.safetensors_io import CheckpointError
from jaxvlm import FastVisionModel
from jaxvlm.models.base import ConfigError


def load(path):
    return FastVisionModel.from_pretrained(str(path), dtype="float32", load_in_4bit=False)


@pytest.fixture
def model_dir(tiny, tmp_path):
    """A writable copy of a tiny saved model."""
    shutil.copytree(tiny[1], tmp_path, dirs_exist_ok=True)
    return tmp_path


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_unsupported_model_type_lists_the_supported_ones(model_dir):
    edit_config(model_dir, lambda c: c.update(model_type="llava_onevision"))
    from jaxvlm.models import REGISTRY
    assert {"gemma3", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"} <= set(REGISTRY)
    with pytest.raises(ValueError, match=re.escape(f"'llava_onevision' is not supported; supported: {', '.join(sorted(REGISTRY))}")):
        load(model_dir)


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(model_dir)


def test_missing_safetensors_file(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(model_dir)


def test_missing_shard_named_in_the_index(tiny, tmp_path):
    tiny[2].save_pretrained(tmp_path, max_shard_size="100KB")
    shutil.copytree(tiny[1], tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard named in .* is missing"):
        load(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin"])
def test_pickled_checkpoint_is_refused_with_how_to_convert(model_dir, name):
    (model_dir / "model.safetensors").unlink()
    (model_dir / name).write_bytes(b"not read: refused before opening")
    with pytest.raises(CheckpointError) as e:
        load(model_dir)
    message = str(e.value)
    assert message.startswith(f"{model_dir / name}: a pickled PyTorch checkpoint")
    assert "loading a pickle can run arbitrary code" in message
    assert "save_pretrained(dir, safe_serialization=True)" in message


def test_truncated_safetensors_file(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated safetensors file: tensor .* ends at byte"):
        load(model_dir)


def test_missing_tensor_is_named(model_dir):
    edit_tensors(model_dir, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors for model\.language_model\.norm\.weight"):
        load(model_dir)


def test_missing_layer_of_a_stack_is_named(model_dir):
    edit_tensors(model_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.mlp\.up_proj\.weight: expected layers 0\.\.2, missing \[1\]"):
        load(model_dir)


def test_unexpected_tensor_is_named(model_dir):
    edit_tensors(model_dir, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .* model\.layers\.0\.self_attn\.extra\.weight"):
        load(model_dir)


def test_misshaped_tensor_names_key_and_both_shapes(model_dir):
    def shrink(t):
        t["model.layers.0.mlp.gate_proj.weight"] = np.zeros((127, 64), np.float32)
    edit_tensors(model_dir, shrink)
    with pytest.raises(CheckpointError,
                       match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(127, 64\), the model expects \(128, 64\)"):
        load(model_dir)


def test_config_with_unknown_rope_type(model_dir):
    edit_config(model_dir, lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn", factor=2.0,
                                                                                original_max_position_embeddings=512))
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        load(model_dir)


def test_config_with_mrope_sections_that_do_not_fit_the_head(model_dir):
    edit_config(model_dir, lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[4, 4, 4]))
    with pytest.raises(ConfigError, match=r"mrope_section=\[4, 4, 4\]: expected 3 sections summing to head_dim/2 = 8"):
        load(model_dir)


def test_unknown_activation(model_dir):
    edit_config(model_dir, lambda c: c["vision_config"].update(hidden_act="swish_plus"))
    with pytest.raises(ConfigError, match="vision_config.hidden_act='swish_plus'"):
        load(model_dir)


def test_hub_id_offline_without_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="offline"):
        load("unsloth/Qwen2-VL-2B-Instruct")


def test_importer_budget_holds_at_most_its_limit_but_lets_a_larger_param_through_alone():
    """Params load on threads: the bytes read and not yet on the device stay under the budget's limit, and a param
    larger than the limit still loads (alone)."""
    import threading
    import time

    from jaxvlm.converters.hf_import import _Budget
    budget, holders, seen, lock = _Budget(10), [], [], threading.Lock()

    def load(n):
        with budget.holding(n):
            with lock:
                holders.append(n)
                seen.append(list(holders))
            time.sleep(0.02)
            with lock:
                holders.remove(n)

    threads = [threading.Thread(target=load, args=(n,)) for n in (4, 4, 4, 25, 3, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads) and len(seen) == 6
    assert all(sum(h) <= 10 or h == [25] for h in seen), seen
    assert any(len(h) > 1 for h in seen)  # the small ones did load side by side
