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


def test_existing_non_empty_directory_is_refused_unless_overwrite(loaded, tmp_path):
    family, model, processor = loaded
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
        model.save_pretrained_merged(str(out), processor)
    assert os.listdir(out) == ["keep.txt"]
    model.save_pretrained_merged(str(out), processor, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


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
