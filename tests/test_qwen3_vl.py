"""Qwen3-VL (dense) through the family seam: transformers' fp32 logits, greedy and seeded generation, LoRA
targets, PEFT adapters, LoRA SFT losses against transformers + PEFT, merged 16-bit and 4-bit export, 4-bit import
(load_in_4bit and bitsandbytes checkpoints), and the CLIs, on a tiny random model whose config switches on what
the real checkpoints use."""
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
from tests.test_qwen2_vl_parity import (assert_greedy_matches, assert_logits_match, encode, hf_logits,
                                        load)
from tests.test_quantized_import import PROCESSOR_FILES, bnb_dequantized, weight

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
    assert_greedy_matches(model, hf_model, batch, eos=EOS, pad=PAD)


def test_sampling_with_top_k_1_is_greedy_and_seeds_reproduce(loaded):
    model, processor, hf_model = loaded
    batch = padded_batch(processor, "left")
    kw = dict(max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD)
    greedy = model.generate(**batch, **kw)
    np.testing.assert_array_equal(model.generate(**batch, **kw, do_sample=True, top_k=1), greedy)
    a, b, c = (model.generate(**batch, **kw, do_sample=True, temperature=1.5, top_p=0.95, min_p=0.01, seed=s)
               for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


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


@pytest.fixture(scope="module")
def bnb_checkpoint(tiny, tmp_path_factory):
    """(dir of the tiny Qwen3-VL quantized + saved by transformers + bitsandbytes, the float model with
    bitsandbytes' dequantization of each 4-bit weight)."""
    import shutil

    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    path, hf_model = tiny
    quantized = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)))
    out = tmp_path_factory.mktemp(f"{FAMILY}-bnb4")
    quantized.save_pretrained(out)
    for name in PROCESSOR_FILES:
        shutil.copy(f"{path}/{name}", out)
    reference = copy.deepcopy(hf_model).eval()
    modules = dict(quantized.named_modules())
    n = 0
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(modules.get(name), bnb.nn.Linear4bit):
                module.weight.copy_(bnb_dequantized(modules[name].weight))
                n += 1
    assert n > 0
    return str(out), reference


def test_bnb_4bit_checkpoint_imports_as_nf4_with_bitsandbytes_logits(bnb_checkpoint):
    path, reference = bnb_checkpoint
    model, processor = load(path, load_in_4bit=True)
    for key in ("model.language_model.layers.0.mlp.down_proj.weight",
                "model.language_model.layers.1.self_attn.q_proj.weight", "model.visual.blocks.0.attn.qkv.weight"):
        assert isinstance(weight(model, key), NF4), key
    assert not isinstance(weight(model, "lm_head.weight"), NF4)
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


# -- 5. a PEFT adapter made by PEFT ---------------------------------------------------------------


def test_peft_adapter_loads_here_with_peft_logits(loaded, tmp_path):
    from peft import LoraConfig, get_peft_model
    model, processor, hf_model = loaded
    regex = get_peft_regex(list(linear_modules(model)))
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=4, lora_alpha=16, target_modules=regex, init_lora_weights=False, modules_to_save=["lm_head"]))
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    peft_model.save_pretrained(tmp_path)
    batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
    ref = hf_logits(peft_model.eval(), batch)
    assert np.abs(np.asarray(model(**batch)) - ref).max() > 1e-2, "the adapter should change the logits"
    # model.load_adapter is jaxvlm.converters.peft_adapter.load_adapter(model, dir)
    assert_logits_match(model.load_adapter(str(tmp_path))(**batch), ref, batch["attention_mask"])


# -- 6. data and training ---------------------------------------------------------------------------


def test_lora_sft_losses_equal_transformers_and_peft_for_3_steps(tiny, tmp_path):
    """Our collator with train_on_responses_only and the family's own markers, our SFTTrainer, and
    transformers + PEFT + torch AdamW from the same LoRA init on the same batches: the same step losses."""
    from peft import PeftModel
    from jaxvlm.train import VisionDataCollator
    from tests.test_trainer import make_trainer, train_and_compare_with_peft
    path, hf_model = tiny
    trainer = make_trainer(path, 3, tmp_path / "out", is_trainable=None)
    trainer.collator = VisionDataCollator(trainer.model, trainer.processor, train_on_responses_only=True)
    trainer.model = FastVisionModel.get_peft_model(trainer.model, r=8, lora_alpha=16, random_state=0)
    trainer.model.save_pretrained(str(tmp_path / "init"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "init"), is_trainable=True)
    labels = trainer.micro_batch(0)[0]["labels"]
    assert 0 < (labels != -100).sum() < labels.size // 2, "only the assistant's answer is trained on"
    train_and_compare_with_peft(trainer, peft_model, 3)


# -- 7. export and CLIs -----------------------------------------------------------------------------


def test_merged_4bit_export_loads_in_transformers_with_bitsandbytes(loaded, tmp_path):
    import json

    import bitsandbytes as bnb
    import transformers
    from jaxvlm.layers import dense_weight
    model, processor, hf_model = loaded
    model.save_pretrained_merged(str(tmp_path / "q4"), processor, save_method="merged_4bit")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    exported = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "q4", dtype=torch.float32)
    assert type(exported).__name__ == "Qwen3VLForConditionalGeneration"
    quantized = {n: m for n, m in exported.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "model.language_model.layers.1.mlp.up_proj" in quantized and "model.visual.blocks.0.attn.qkv" in quantized
    assert "lm_head" not in quantized
    # The mergers are written 16-bit, and transformers must keep them so (not quantize them as it loads).
    assert not [n for n in quantized if ".merger." in n or ".deepstack_merger_list." in n]
    ours, _ = load(str(tmp_path / "q4"), load_in_4bit=True)
    for name, module in quantized.items():
        w = weight(ours, name + ".weight")
        assert isinstance(w, NF4), name
        np.testing.assert_array_equal(np.asarray(dense_weight(w, np.float32)), bnb_dequantized(module.weight).numpy())


def test_train_and_generate_clis(tiny, tmp_path, capsys):
    from jaxvlm.cli import generate, train
    from tests.test_cli import train_args, write_records
    path, hf_model = tiny
    data = write_records(tmp_path / "data")
    out = tmp_path / "run"
    assert train.main(train_args(path, data, out, "--max-steps", "2", "--rank", "4",
                                 "--train-on-responses-only")) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    image = str(tmp_path / "data" / "imgs" / "0.png")
    assert generate.main(["--model", path, "--adapter", str(adapter), "--image", image, "--prompt",
                          "which digit is this", "--max-new-tokens", "4", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip()


def test_engine_gives_each_request_the_tokens_of_generate(loaded):
    from tests.test_engine import check_decode_writes_the_cache_in_place, check_engine_matches_generate
    model, processor, _ = loaded
    check_engine_matches_generate(model, processor, pad=PAD)
    check_decode_writes_the_cache_in_place(model)
