import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from tests.tiny import build_hf_model, save_tiny_processor

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
# The longest files (minutes each), run first: the test command spreads whole files over two processes
# (pytest-xdist --dist loadfile, in collection order), and a long file taken last would run on alone at the end.
LONGEST_FIRST = ("test_sharding.py", "test_llava.py", "test_gemma3.py", "test_qwen3_vl_moe.py", "test_trainer.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


def save_tiny_model(path, family, **text_overrides):
    """Saves a tiny random transformers model of `family` and its processor into `path`; returns the model."""
    model = build_hf_model(family, **text_overrides)
    model.save_pretrained(path)
    save_tiny_processor(path, family)
    return model


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, model dir, transformers model) for each family, saved once per session."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, str(path), save_tiny_model(path, request.param)


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat(text, n_images=0):
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]
