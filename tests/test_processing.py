"""load_processor gives transformers' Qwen2-VL / Qwen2.5-VL processing, with or without torch installed."""
import json
import os
import pickle
import re

import numpy as np
import pytest
import transformers
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from jaxvlm.processing import _SUBPROCESSOR_LOADERS, _check_subprocessor_loader, load_processor
from tests.conftest import FAMILIES, chat, random_image
from tests.notorch import run_without_torch
from tests.tiny import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID, VOCAB, save_tiny_processor

IMAGE_PAD = "<|image_pad|>"
MERGE = 2
PROCESSOR_CLASSES = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor}


@pytest.fixture(params=FAMILIES)
def tiny_processor(request, tmp_path):
    """(family, dir) of a tiny processor saved by save_tiny_processor."""
    save_tiny_processor(str(tmp_path), request.param)
    return request.param, str(tmp_path)


def prompt(processor, text, n_images):
    return processor.apply_chat_template(chat(text, n_images), tokenize=False, add_generation_prompt=True)


def reference(model_dir, text, images):
    """What a Qwen2-VL processor returns for one prompt, from transformers' tokenizer and PIL image processor.

    Each <|image_pad|> stands for one image and becomes prod(grid_thw) / merge**2 copies of itself.
    """
    vision = Qwen2VLImageProcessorPil.from_pretrained(model_dir)(images, return_tensors="np")
    counts = iter(np.prod(vision["image_grid_thw"], axis=1) // MERGE**2)
    text = re.sub(re.escape(IMAGE_PAD), lambda _: IMAGE_PAD * int(next(counts)), text)
    input_ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="np")["input_ids"]
    return dict(input_ids=input_ids, mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).astype(np.int64), **vision)


def test_tiny_tokenizer_holds_the_config_token_ids(tiny_processor):
    tokenizer = load_processor(tiny_processor[1]).tokenizer
    ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", IMAGE_PAD, "<|video_pad|>"])
    assert ids == [VISION_START_ID, VISION_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]
    assert len(tokenizer) == VOCAB


def test_chat_template_renders_qwen_turns(tiny_processor):
    processor = load_processor(tiny_processor[1])
    assert prompt(processor, "What is this?", 1) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_chat_templated_text_has_no_unknown_tokens(tiny_processor):
    processor = load_processor(tiny_processor[1])
    text = prompt(processor, "Describe the image: which digit is it?", 1)
    assert processor.tokenizer.unk_token_id not in processor.tokenizer(text)["input_ids"]


def test_is_the_familys_transformers_processor(tiny_processor):
    family, model_dir = tiny_processor
    assert isinstance(load_processor(model_dir), PROCESSOR_CLASSES[family])


def test_one_image_matches_transformers(tiny_processor):
    processor = load_processor(tiny_processor[1])
    text, images = prompt(processor, "What is this?", 1), [random_image(56, 84)]
    ours = processor(text=[text], images=images, padding=True, return_tensors="np")
    ref = reference(tiny_processor[1], text, images)
    assert set(ours) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    for key, value in ref.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    assert ours["attention_mask"].all()


def test_image_tokens_are_grid_over_merge_squared(tiny_processor):
    processor = load_processor(tiny_processor[1])
    out = processor(text=[prompt(processor, "What is this?", 1)], images=[random_image(56, 84)],
                    padding=True, return_tensors="np")
    t, h, w = out["image_grid_thw"][0]
    assert (t, h, w) == (1, 84 // 14, 56 // 14)
    assert out["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum() == t * h * w // MERGE**2
    np.testing.assert_array_equal(out["mm_token_type_ids"], out["input_ids"] == IMAGE_TOKEN_ID)


def test_two_images_of_different_sizes_in_one_prompt(tiny_processor):
    processor = load_processor(tiny_processor[1])
    text, images = prompt(processor, "What is this?", 2), [random_image(56, 84), random_image(112, 56, seed=1)]
    out = processor(text=[text], images=images, padding=True, return_tensors="np")
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 6, 4], [1, 4, 8]])
    assert out["pixel_values"].shape == (24 + 32, 3 * 2 * 14 * 14)
    assert (out["input_ids"] == IMAGE_TOKEN_ID).sum() == (24 + 32) // MERGE**2
    for key, value in reference(tiny_processor[1], text, images).items():
        np.testing.assert_array_equal(out[key], value, err_msg=key)


def test_batch_of_two_prompts_is_padded(tiny_processor):
    processor = load_processor(tiny_processor[1])
    texts = [prompt(processor, "What is this?", 1), prompt(processor, "Describe the image in one answer", 1)]
    images = [random_image(56, 84), random_image(112, 112, seed=1)]
    out = processor(text=texts, images=images, padding=True, return_tensors="np")
    rows = [reference(tiny_processor[1], text, [image])["input_ids"][0] for text, image in zip(texts, images)]
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, max(map(len, rows)))
    assert out["mm_token_type_ids"].shape == out["input_ids"].shape
    for i, row in enumerate(rows):
        assert out["attention_mask"][i].sum() == len(row)
        np.testing.assert_array_equal(out["input_ids"][i][out["attention_mask"][i] == 1], row)
        np.testing.assert_array_equal(out["input_ids"][i][out["attention_mask"][i] == 0],
                                      processor.tokenizer.pad_token_id)
    assert [(r == IMAGE_TOKEN_ID).sum() for r in out["input_ids"]] == [24 // MERGE**2, 64 // MERGE**2]
    assert out["pixel_values"].shape == (24 + 64, 3 * 2 * 14 * 14)


def test_saved_processor_loads_back(tiny_processor, tmp_path):
    processor = load_processor(tiny_processor[1])
    processor.save_pretrained(str(tmp_path / "saved"))
    text, images = prompt(processor, "What is this?", 1), [random_image(56, 84)]
    before = processor(text=[text], images=images, return_tensors="np")
    after = load_processor(str(tmp_path / "saved"))(text=[text], images=images, return_tensors="np")
    assert type(load_processor(str(tmp_path / "saved"))) is type(processor)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_processor_pickles(tiny_processor):
    # datasets.map fingerprints and worker processes pickle the processor.
    processor = load_processor(tiny_processor[1])
    clone = pickle.loads(pickle.dumps(processor))
    text, images = prompt(processor, "What is this?", 1), [random_image(56, 84)]
    np.testing.assert_array_equal(clone(text=[text], images=images, return_tensors="np")["input_ids"],
                                  processor(text=[text], images=images, return_tensors="np")["input_ids"])


def test_a_transformers_without_the_loader_we_override_is_named(monkeypatch):
    _check_subprocessor_loader()  # the installed transformers has one of them
    for name in _SUBPROCESSOR_LOADERS:
        monkeypatch.delattr(transformers.processing_utils.ProcessorMixin, name, raising=False)
    with pytest.raises(RuntimeError, match=rf"transformers {re.escape(transformers.__version__)}: .*torchvision"):
        _check_subprocessor_loader()


def test_works_without_torch(tiny_processor):
    model_dir = tiny_processor[1]
    code = f"""
import json, sys
import numpy as np
from PIL import Image
from jaxvlm.processing import load_processor
processor = load_processor({model_dir!r})
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is this?"}}]}}]
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 56, 3), dtype=np.uint8))
out = processor(text=[text], images=[image], padding=True, return_tensors="np")
print(json.dumps({{"input_ids": out["input_ids"].tolist(), "image_grid_thw": out["image_grid_thw"].tolist(),
                  "torch_imported": "torch" in sys.modules}}))
"""
    result = json.loads(run_without_torch(code).strip().splitlines()[-1])
    assert not result["torch_imported"]
    processor = load_processor(model_dir)
    ref = reference(model_dir, prompt(processor, "What is this?", 1), [random_image(56, 84)])
    assert result["input_ids"] == ref["input_ids"].tolist()
    assert result["image_grid_thw"] == ref["image_grid_thw"].tolist()


def test_torch_is_hidden_in_the_no_torch_subprocess():
    out = run_without_torch("""
import importlib.util
try:
    import torch
except ImportError:
    print(importlib.util.find_spec("torch"), importlib.util.find_spec("torchvision"))
""")
    assert out.strip() == "None None"


@pytest.mark.parametrize("missing, named", [(["tokenizer.json", "tokenizer_config.json"], "tokenizer"),
                                            (["preprocessor_config.json"], "preprocessor_config.json")])
def test_missing_file_error_names_the_dir(tiny_processor, missing, named):
    model_dir = tiny_processor[1]
    for name in missing:
        os.remove(os.path.join(model_dir, name))
    with pytest.raises(FileNotFoundError, match=re.escape(model_dir) + ".*" + re.escape(named)):
        load_processor(model_dir)


def test_processor_class_of_another_family_is_named(tiny_processor):
    family, model_dir = tiny_processor
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({"model_type": family}, f)
    config_file = os.path.join(model_dir, "preprocessor_config.json")
    with open(config_file) as f:
        config = json.load(f)
    with open(config_file, "w") as f:
        json.dump({**config, "processor_class": "LlavaProcessor"}, f)
    with pytest.raises(ValueError, match="processor_class is 'LlavaProcessor', expected one of"):
        load_processor(model_dir)
