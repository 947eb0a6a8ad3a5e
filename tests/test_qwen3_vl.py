"""Qwen3-VL (dense) through the family seam: transformers' fp32 logits, greedy generation, LoRA targets and
merged export, 4-bit import, on a tiny random model whose config switches on what the real checkpoints use."""
import copy

import numpy as np
import pytest
import torch

from jaxvlm import FastVisionModel
from jaxvlm.lora import linear_modules
from jaxvlm.quant import NF4
from jaxvlm.targets import get_peft_regex, select_modules
from tests.conftest import chat, random_image, save_tiny_model
from tests.test_lora import _is_adapted, peft_adapted, with_random_b
from tests.test_qwen2_vl_parity import assert_logits_match, encode, hf_logits, load
from tests.test_quantized_import import bnb_dequantized, weight

FAMILY = "qwen3_vl"
EOS, PAD = 287, 285


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, transformers model) of the tiny Qwen3-VL, saved once for this module."""
    path = tmp_path_factory.mktemp(FAMILY)
    return str(path), save_tiny_model(path, FAMILY)


@pytest.fixture(scope="module")
def loaded(tiny):
    path, hf_model = tiny
    model, processor = load(path)
    return model, processor, hf_model


def padded_batch(processor, side):
    texts = [chat("describe the image", 1), chat("what is this digit in the image then tell me why", 1)]
    old = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = side
    try:
        return encode(processor, texts, [random_image(56, 56, seed=3), random_image(84, 56, seed=4)])
    finally:
        processor.tokenizer.padding_side = old


def test_tiny_config_uses_the_switches_of_the_real_checkpoints(tiny):
    path, hf_model = tiny
    text, vision = hf_model.config.text_config, hf_model.config.vision_config
    assert len(vision.deepstack_visual_indexes) >= 2
    assert len(vision.deepstack_visual_indexes) < text.num_hidden_layers  # a text layer without deepstack too
    assert text.rope_parameters["mrope_interleaved"] and text.head_dim != text.hidden_size // text.num_attention_heads
    assert text.num_key_value_heads < text.num_attention_heads
    assert any(k.endswith("self_attn.q_norm.weight") for k in hf_model.state_dict())
    assert vision.num_position_embeddings ** 0.5 % 1 == 0 and vision.num_position_embeddings > 4


# -- 1. logits --------------------------------------------------------------------------------------


def test_text_only(loaded):
    model, processor, hf_model = loaded
    batch = encode(processor, [chat("what is this digit")])
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_one_image(loaded):
    model, processor, hf_model = loaded
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
    assert batch["pixel_values"].shape[0] > 4 and "mm_token_type_ids" in batch
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_two_images_of_different_sizes_in_one_sample(loaded):
    model, processor, hf_model = loaded
    images = [random_image(56, 84, seed=1), random_image(112, 56, seed=2)]
    batch = encode(processor, [chat("what is the difference", 2)], images)
    grids = batch["image_grid_thw"]
    assert len(grids) == 2 and not np.array_equal(grids[0], grids[1])
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_of_two_with_padding(loaded, side):
    model, processor, hf_model = loaded
    batch = padded_batch(processor, side)
    pad_column = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, pad_column] == 0).any(), f"one prompt should be {side}-padded"
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


# -- 2. generation ----------------------------------------------------------------------------------


def test_greedy_equals_transformers_for_a_left_padded_batch_with_images(loaded):
    model, processor, hf_model = loaded
    batch = padded_batch(processor, "left")
    assert (batch["attention_mask"][:, 0] == 0).any()
    ours = model.generate(**batch, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        ref = hf_model.generate(**tensors, do_sample=False, max_new_tokens=16, eos_token_id=EOS,
                                pad_token_id=PAD).numpy()
    assert ours.shape == ref.shape == (2, batch["input_ids"].shape[1] + 16)
    np.testing.assert_array_equal(ours, ref)


# -- 3. LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision,language,attention,mlp", [
    (True, True, True, True), (True, False, True, False), (False, True, False, True), (True, True, False, True)])
def test_adapted_modules_equal_peft_with_unsloths_regex(loaded, vision, language, attention, mlp):
    model, processor, hf_model = loaded
    flags = dict(finetune_vision_layers=vision, finetune_language_layers=language,
                 finetune_attention_modules=attention, finetune_mlp_modules=mlp)
    names = list(linear_modules(model))
    assert {n for n in names if "deepstack_merger_list" in n}, "the deepstack mergers are Linear modules here"
    regex = get_peft_regex(names, vision, language, attention, mlp)
    adapted = FastVisionModel.get_peft_model(model, r=2, **flags)
    ours = {name for name, (param, layer) in linear_modules(adapted).items() if _is_adapted(adapted, param, layer)}
    assert ours == set(select_modules(names, regex))
    assert ours == peft_adapted(copy.deepcopy(hf_model), regex)
    assert "lm_head" not in ours and not any("merger" in n for n in ours)


def test_merged_16bit_export_loads_in_transformers_with_our_logits(loaded, tmp_path):
    import transformers
    model, processor, hf_model = loaded
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4, lora_alpha=8))
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
    ours = np.asarray(adapted(**batch))
    assert np.abs(ours - hf_logits(hf_model, batch)).max() > 1e-2, "the adapter should change the logits"
    adapted.save_pretrained_merged(str(tmp_path / "out"), processor, save_method="merged_16bit")
    merged = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert_logits_match(ours, hf_logits(merged.eval(), batch), batch["attention_mask"])


# -- 4. 4-bit ---------------------------------------------------------------------------------------


def test_load_in_4bit_quantizes_linear_weights_outside_quant_skip_as_bitsandbytes_does(tiny):
    import bitsandbytes.functional as F
    path, hf_model = tiny
    model, processor = load(path, load_in_4bit=True)
    reference = copy.deepcopy(hf_model)
    kept = []
    with torch.no_grad():
        for name, module in reference.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            ours = weight(model, name + ".weight")
            if name == "lm_head" or ".merger." in name or ".deepstack_merger_list." in name:
                assert not isinstance(ours, NF4), name
                kept.append(name)
                continue
            assert isinstance(ours, NF4), name
            packed, state = F.quantize_4bit(module.weight.data.clone(), quant_type="nf4", compress_statistics=True,
                                            blocksize=64)
            np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().ravel())
            module.weight.copy_(bnb_dequantized(type("W", (), {"data": packed, "quant_state": state})))
    assert "lm_head" in kept and any(".deepstack_merger_list." in k for k in kept)
    visual = model.model.visual
    assert not isinstance(visual.patch_embed.proj.weight.get_value(), NF4)
    assert not isinstance(visual.pos_embed.weight.get_value(), NF4)
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])
