"""Merged exports load back in transformers with our logits; the export directory is never half-written."""
import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import chat, random_image
from tests.test_qwen2_vl_parity import assert_logits_match, encode, hf_logits, load


@pytest.fixture(scope="module")
def loaded(tiny):
    family, path, hf_model = tiny
    model, processor = load(path)
    return family, model, processor


def batch_for(processor):
    return encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])


@pytest.mark.parametrize("auto_class", [True, False])
def test_merged_16bit_loads_in_transformers_with_our_logits(loaded, tmp_path, auto_class):
    import transformers
    family, model, processor = loaded
    model.save_pretrained_merged(str(tmp_path / "out"), processor, save_method="merged_16bit")
    cls = (transformers.AutoModelForImageTextToText if auto_class else
           {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[family])
    hf_model = cls.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    batch = batch_for(processor)
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])
    assert (tmp_path / "out" / "preprocessor_config.json").exists() or (tmp_path / "out" / "processor_config.json").exists()


def test_sharded_export_writes_an_index_and_reimports(loaded, tmp_path):
    from jaxvlm import FastVisionModel
    family, model, processor = loaded
    model.save_pretrained_merged(str(tmp_path / "out"), processor, max_shard_size="100KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any(k.startswith("model.layers.0.") for k in index["weight_map"])  # transformers' on-disk names
    again, _ = FastVisionModel.from_pretrained(str(tmp_path / "out"), dtype="float32", load_in_4bit=False)
    batch = batch_for(processor)
    np.testing.assert_array_equal(np.asarray(again(**batch)), np.asarray(model(**batch)))


def test_unknown_save_method(loaded, tmp_path):
    family, model, processor = loaded
    with pytest.raises(ValueError, match="save_method='merged_8bit': expected one of merged_16bit, merged_4bit, lora"):
        model.save_pretrained_merged(str(tmp_path / "out"), processor, save_method="merged_8bit")


def test_a_failed_export_leaves_nothing_behind(loaded, tmp_path, monkeypatch):
    import jaxvlm.export as export
    family, model, processor = loaded

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(export, "_copy_configs", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained_merged(str(tmp_path / "out"), processor)
    assert os.listdir(tmp_path) == []


def test_push_to_hub_offline_is_a_clear_error(loaded, monkeypatch):
    from huggingface_hub import constants
    family, model, processor = loaded
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="offline"):
        model.push_to_hub_merged("someone/tiny", processor)


def test_push_to_hub_uploads_the_merged_directory(loaded, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    family, model, processor = loaded
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private)
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["files"] = sorted(os.listdir(folder_path))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = model.push_to_hub_merged("someone/tiny", processor, token="t", private=True)
    assert url.endswith("someone/tiny") and calls["repo"] == ("someone/tiny", True) and calls["token"] == "t"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(calls["files"])


def test_merged_4bit_loads_with_bitsandbytes_and_reimports(loaded, tmp_path):
    import bitsandbytes as bnb
    import transformers
    from jaxvlm import FastVisionModel
    from jaxvlm.quant import NF4
    from tests.test_quantized_import import bnb_dequantized
    family, model, processor = loaded
    model.save_pretrained_merged(str(tmp_path / "q4"), processor, save_method="merged_4bit")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "q4", dtype=torch.float32)
    quantized = {n: m for n, m in hf_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "model.language_model.layers.0.mlp.up_proj" in quantized and "lm_head" not in quantized
    assert not [n for n in quantized if ".merger." in n], "the merger is written 16-bit and must load so"
    ours, _ = FastVisionModel.from_pretrained(str(tmp_path / "q4"), dtype="float32", load_in_4bit=True)
    w = ours.model.language_model.layers.mlp.up_proj.weight.get_value()
    assert isinstance(w, NF4)
    from jaxvlm.layers import dense_weight
    np.testing.assert_array_equal(np.asarray(dense_weight(w, np.float32))[0],
                                  bnb_dequantized(quantized["model.language_model.layers.0.mlp.up_proj"].weight).numpy())
    # The export quantizes the same weights load_in_4bit would: the reimported model is that model.
    direct, _ = FastVisionModel.from_pretrained(model.model_dir, dtype="float32", load_in_4bit=True)
    batch = batch_for(processor)
    np.testing.assert_allclose(np.asarray(ours(**batch)), np.asarray(direct(**batch)), rtol=0, atol=1e-6)


def test_merged_16bit_after_lora_training_matches_in_transformers(tiny, tmp_path):
    import transformers
    from jaxvlm import FastVisionModel
    from tests.test_trainer import make_trainer
    family, path, _ = tiny
    trainer = make_trainer(path, 3, tmp_path / "run", is_trainable=None)
    trainer.model = FastVisionModel.get_peft_model(trainer.model, r=8, lora_alpha=16)
    trainer.train()
    model, processor = trainer.model, trainer.processor
    model.save_pretrained_merged(str(tmp_path / "merged"), processor)
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    batch = batch_for(processor)
    base, _ = load(path)
    assert np.abs(np.asarray(base(**batch)) - np.asarray(model(**batch))).max() > 1e-3, "training changed nothing"
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])
