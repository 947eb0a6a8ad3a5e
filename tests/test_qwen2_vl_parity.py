"""Qwen2-VL and Qwen2.5-VL imported from transformers checkpoints give transformers' fp32 logits."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jaxvlm import FastVisionModel
from tests.conftest import chat, random_image, save_tiny_model

TOL = 1e-4  # max abs logit error, relative to the largest |logit|


def load(path, **kw):
    kw = {"dtype": "float32", "load_in_4bit": False, **kw}
    return FastVisionModel.from_pretrained(path, **kw)


def hf_logits(hf_model, batch):
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        return hf_model(**tensors).logits.numpy()


def assert_logits_match(ours, ref, attention_mask):
    keep = np.asarray(attention_mask).astype(bool)
    ours, ref = np.asarray(ours)[keep], ref[keep]
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= TOL * scale, f"max abs error {err:.3g} for logit scale {scale:.3g}"


def assert_greedy_matches(model, hf_model, batch, new_tokens=16, eos=287, pad=285):
    """Greedy `model.generate` gives transformers' tokens for `new_tokens` steps (the tiny vocabulary's ids)."""
    ours = model.generate(**batch, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        ref = hf_model.generate(**tensors, do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos,
                                pad_token_id=pad).numpy()
    assert ours.shape == ref.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + new_tokens)
    np.testing.assert_array_equal(ours, ref)


def encode(processor, texts, images=None):
    prompts = [processor.apply_chat_template(t, tokenize=False, add_generation_prompt=True) for t in texts]
    return dict(processor(text=prompts, images=images, padding=True, return_tensors="np"))


@pytest.fixture(scope="module")
def loaded(tiny):
    family, path, hf_model = tiny
    model, processor = load(path)
    return model, processor, hf_model


def test_text_only(loaded):
    model, processor, hf_model = loaded
    batch = encode(processor, [chat("what is this digit")])
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_one_image(loaded):
    model, processor, hf_model = loaded
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
    assert batch["pixel_values"].shape[0] > 4
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_two_images_of_different_sizes_in_one_sample(loaded):
    model, processor, hf_model = loaded
    images = [random_image(56, 84, seed=1), random_image(112, 56, seed=2)]
    batch = encode(processor, [chat("what is the difference", 2)], images)
    grids = batch["image_grid_thw"]
    assert len(grids) == 2 and not np.array_equal(grids[0], grids[1])
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_of_two_with_padding(loaded, side, monkeypatch):
    model, processor, hf_model = loaded
    monkeypatch.setattr(processor.tokenizer, "padding_side", side)
    texts = [chat("describe the image", 1), chat("what is this digit in the image then tell me why", 1)]
    batch = encode(processor, texts, [random_image(56, 56, seed=3), random_image(84, 56, seed=4)])
    pad_column = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, pad_column] == 0).any(), f"one prompt should be {side}-padded"
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_forward_is_jittable_on_prepared_inputs(loaded):
    import jax
    from flax import nnx
    model, processor, hf_model = loaded
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 56)])
    inputs = model.prepare_inputs(**batch)
    logits = nnx.jit(lambda m, x: m.forward(x))(model, jax.tree.map(np.asarray, inputs))
    assert_logits_match(logits, hf_logits(hf_model, batch), batch["attention_mask"])


def test_bf16_forward_stays_close_to_fp32(tiny):
    family, path, hf_model = tiny
    model32, processor = load(path)
    model16, _ = load(path, dtype="bfloat16")
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
    l32, l16 = np.asarray(model32(**batch)), np.asarray(model16(**batch)).astype(np.float32)
    assert l16.dtype == np.float32 and np.isfinite(l16).all()
    rel = np.abs(l16 - l32).max() / np.abs(l32).max()
    assert rel < 0.05, f"bf16 logits differ from fp32 by {rel:.3g} of the logit scale"


def test_current_key_names_on_disk(tiny, tmp_path):
    """Checkpoints saved with the in-memory names (model.language_model.*, model.visual.*) import too."""
    family, path, hf_model = tiny
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "model.safetensors")
    state = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, processor = load(str(tmp_path))
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_sharded_checkpoint(tiny, tmp_path):
    family, path, hf_model = tiny
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    shutil.copytree(path, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, processor = load(str(tmp_path))
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_tied_word_embeddings(tmp_path):
    hf_model = save_tiny_model(tmp_path, "qwen2_vl", tie_word_embeddings=True)
    assert hf_model.config.tie_word_embeddings
    model, processor = load(str(tmp_path))
    assert model.lm_head is None
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 56)])
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_import_and_forward_without_torch(tiny):
    """JAX users often have no torch: from_pretrained + processor + forward must not need it."""
    from tests.notorch import run_without_torch
    family, path, hf_model = tiny
    batch = encode(load(path)[1], [chat("describe the image", 1)], [random_image(56, 84)])
    expected = hf_logits(hf_model, batch)
    out = run_without_torch(f"""
import sys, numpy as np
from PIL import Image
from jaxvlm import FastVisionModel
model, processor = FastVisionModel.from_pretrained({path!r}, dtype="float32", load_in_4bit=False)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 56, 3), dtype=np.uint8))
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "describe the image"}}]}}]
prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
logits = model(**processor(text=[prompt], images=[image], return_tensors="np"))
np.save(sys.stdout.buffer, np.asarray(logits))
assert "torch" not in sys.modules
""", binary=True)
    import io
    assert_logits_match(np.load(io.BytesIO(out)), expected, batch["attention_mask"])
