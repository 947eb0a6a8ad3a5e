"""load_processor gives transformers' PixtralProcessor processing (llava with a Pixtral tower, mistral3) without
torchvision, and without torch for return_tensors="np"."""
import importlib
import json
import os
import pickle
import sys

import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
from transformers.utils import is_torchvision_available

from jaxvlm.processing import load_processor, torch_free_processor
from tests.conftest import random_image
from tests.notorch import run_without_torch

IMG, IMG_BREAK, IMG_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", IMG, IMG_BREAK, IMG_END]
WORDS = ["what", "is", "this", "?", "describe", "and", "compare", "the", "images", "."]
PATCH = 4
LONGEST_EDGE = 32
IMAGE_PROCESSOR = {"patch_size": {"height": PATCH, "width": PATCH}, "size": {"longest_edge": LONGEST_EDGE},
                   "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                   "do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
                   "do_convert_rgb": True}
# (width, height): within the longest edge, over it, tall, and a single row of tokens at either merge size.
SIZES = [(20, 12), (50, 30), (10, 40), (13, 7)]
CASES = {
    "one image": (["[IMG] what is this ?"], [SIZES[0]]),
    "two images of different sizes": (["compare [IMG] and [IMG] ."], [SIZES[1], SIZES[2]]),
    "batch of two padded prompts": (["[IMG] what is this ?", "describe the images [IMG] [IMG] ."],
                                    [SIZES[3], SIZES[1], SIZES[2]]),
}
OUTPUTS = {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
TORCHVISION_MODULE = "transformers.models.pixtral.image_processing_pixtral"


def tiny_tokenizer():
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def save_pixtral_dir(path, merge):
    """A processor directory laid out as on the hub (pixtral-12b: merge 1, Mistral Small 3.1: merge 2)."""
    tiny_tokenizer().save_pretrained(path)
    configs = {"preprocessor_config.json": {**IMAGE_PROCESSOR, "image_processor_type": "PixtralImageProcessor"},
               "processor_config.json": {"patch_size": PATCH, "spatial_merge_size": merge, "image_token": IMG,
                                         "image_break_token": IMG_BREAK, "image_end_token": IMG_END}}
    for name, config in configs.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump({**config, "processor_class": "PixtralProcessor"}, f)
    return str(path)


@pytest.fixture(params=[1, 2], ids=["merge1", "merge2"])
def pixtral_dir(request, tmp_path):
    """(spatial_merge_size, dir) of a saved processor."""
    return request.param, save_pixtral_dir(tmp_path, request.param)


@pytest.fixture
def transformers_pixtral(monkeypatch):
    """transformers' own PixtralProcessor class. Without torchvision its module is imported with the PIL image
    processor module in sys.modules in place of the torchvision one (restored after the test)."""
    if is_torchvision_available():
        return transformers.PixtralProcessor
    module = "transformers.models.pixtral.processing_pixtral"
    if module not in sys.modules:
        monkeypatch.setitem(sys.modules, TORCHVISION_MODULE,
                            importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral"))
    return importlib.import_module(module).PixtralProcessor


def images_of(sizes):
    return [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]


def call(processor, texts, images):
    # As jaxvlm's collator calls it.
    return processor(text=texts, images=images, padding=True, return_tensors="np", add_special_tokens=False)


def expected_layout(width, height, merge):
    """An image's tokens and resized (height, width), from Pixtral's rules: the longest edge scaled (floored) to
    at most LONGEST_EDGE, each side rounded up to whole (patch * merge) cells, one [IMG] per cell, rows ended
    by [IMG_BREAK], the last by [IMG_END]."""
    cell = PATCH * merge
    scale = max(width / LONGEST_EDGE, height / LONGEST_EDGE)
    if scale > 1:
        width, height = int(width / scale), int(height / scale)
    rows, cols = -(-height // cell), -(-width // cell)
    tokens = ([IMG] * cols + [IMG_BREAK]) * rows
    tokens[-1] = IMG_END
    return tokens, (rows * cell, cols * cell)


def test_loads_the_torchvision_free_class(pixtral_dir):
    merge, model_dir = pixtral_dir
    processor = load_processor(model_dir)
    assert type(processor).__name__ == "PixtralProcessor"
    assert (processor.patch_size, processor.spatial_merge_size) == (PATCH, merge)
    assert processor.image_token_ids == tiny_tokenizer().convert_tokens_to_ids([IMG, IMG_BREAK, IMG_END])
    if not is_torchvision_available():
        assert type(processor) is torch_free_processor("PixtralProcessor")
        assert isinstance(processor.image_processor, PixtralImageProcessorPil)
        # The PIL module stood in for the torchvision one only while transformers' module was imported.
        assert TORCHVISION_MODULE not in sys.modules


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(pixtral_dir, transformers_pixtral, case):
    merge, model_dir = pixtral_dir
    texts, sizes = CASES[case]
    reference = transformers_pixtral(image_processor=PixtralImageProcessorPil(**IMAGE_PROCESSOR),
                                     tokenizer=tiny_tokenizer(), patch_size=PATCH, spatial_merge_size=merge)
    ours = call(load_processor(model_dir), texts, images_of(sizes))
    ref = call(reference, texts, images_of(sizes))
    assert set(ours) == set(ref) == OUTPUTS
    for key in OUTPUTS:
        assert isinstance(ours[key], np.ndarray), key
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)


@pytest.mark.parametrize("case", CASES)
def test_token_layout_follows_the_image_sizes(pixtral_dir, case):
    merge, model_dir = pixtral_dir
    texts, sizes = CASES[case]
    processor = load_processor(model_dir)
    out = call(processor, texts, images_of(sizes))
    layouts = iter(expected_layout(w, h, merge) for w, h in sizes)
    resized = []
    for i, text in enumerate(texts):
        pieces = text.split(IMG)
        expanded = pieces[0]
        for piece in pieces[1:]:
            tokens, size = next(layouts)
            resized.append(size)
            expanded += "".join(tokens) + piece
        ids = tiny_tokenizer()(expanded, add_special_tokens=False)["input_ids"]
        mask = out["attention_mask"][i]
        assert mask.sum() == len(ids) and mask[:len(ids)].all()
        np.testing.assert_array_equal(out["input_ids"][i][:len(ids)], ids)
        assert (out["input_ids"][i][len(ids):] == processor.tokenizer.pad_token_id).all()
    np.testing.assert_array_equal(out["image_sizes"], resized)
    assert out["pixel_values"].shape == (len(sizes), 3, *np.max(resized, axis=0))
    if len(texts) > 1:
        assert not out["attention_mask"].all()


def test_text_without_images(pixtral_dir):
    processor = load_processor(pixtral_dir[1])
    out = processor(text=["what is this ?"], images=None, return_tensors="np", add_special_tokens=False)
    np.testing.assert_array_equal(out["input_ids"], tiny_tokenizer()(["what is this ?"])["input_ids"])
    assert "pixel_values" not in out


def test_saved_processor_loads_back(pixtral_dir, tmp_path):
    merge, model_dir = pixtral_dir
    processor = load_processor(model_dir)
    saved = str(tmp_path / "saved")
    processor.save_pretrained(saved)
    with open(f"{saved}/processor_config.json") as f:
        config = json.load(f)
    assert config["processor_class"] == "PixtralProcessor"
    loaded = load_processor(saved)
    assert type(loaded) is type(processor)
    assert (loaded.patch_size, loaded.spatial_merge_size) == (PATCH, merge)
    texts, sizes = CASES["batch of two padded prompts"]
    before, after = call(processor, texts, images_of(sizes)), call(loaded, texts, images_of(sizes))
    assert set(after) == OUTPUTS
    for key in OUTPUTS:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_processor_pickles(pixtral_dir):
    processor = load_processor(pixtral_dir[1])
    clone = pickle.loads(pickle.dumps(processor))
    assert type(clone) is type(processor)
    texts, sizes = CASES["two images of different sizes"]
    before, after = call(processor, texts, images_of(sizes)), call(clone, texts, images_of(sizes))
    for key in OUTPUTS:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_works_without_torch(tmp_path):
    # Mistral Small 3.1's merge size 2. A worker process without torch loads the directory and unpickles a
    # processor pickled here (its class is built on unpickling).
    save_pixtral_dir(tmp_path, 2)
    processor = load_processor(str(tmp_path))
    with open(tmp_path / "processor.pkl", "wb") as f:
        pickle.dump(processor, f)
    texts, sizes = CASES["batch of two padded prompts"]
    code = f"""
import json, pickle, sys
import numpy as np
from PIL import Image
with open({str(tmp_path / "processor.pkl")!r}, "rb") as f:
    unpickled = pickle.load(f)
from jaxvlm.processing import load_processor
images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
          for i, (w, h) in enumerate({sizes!r})]
results = []
for processor in (load_processor({str(tmp_path)!r}), unpickled):
    out = processor(text={texts!r}, images=images, padding=True, return_tensors="np", add_special_tokens=False)
    results.append({{k: np.asarray(v).tolist() for k, v in out.items()}})
print(json.dumps({{"results": results, "class": type(unpickled).__name__,
                  "torch_imported": any(m.partition(".")[0] in ("torch", "torchvision") for m in sys.modules)}}))
"""
    result = json.loads(run_without_torch(code).strip().splitlines()[-1])
    assert not result["torch_imported"]
    assert result["class"] == "PixtralProcessor"
    here = call(processor, texts, images_of(sizes))
    for out in result["results"]:
        assert set(out) == OUTPUTS
        for key in OUTPUTS:
            np.testing.assert_allclose(np.asarray(out[key]), here[key], rtol=0, atol=0, err_msg=key)
