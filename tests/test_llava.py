"""The LLaVA composition through the family seam, for its four shapes: `llava` with a CLIP tower (LLaVA 1.5), `llava`
with a Pixtral tower (Pixtral-12B), `llava_next` (anyres tiles, image_newline) and `mistral3` (Pixtral tower, patch
merger, RMSNorm'd projector): transformers' fp32 logits (text only, several images of different sizes in a sample,
a text-only sample beside them, padding on both sides), greedy and seeded generation, 4-bit (load_in_4bit and a
bitsandbytes checkpoint), LoRA targets and PEFT adapters both ways, the collator (image_sizes, images of their own
sizes padded as the processor pads them), LoRA SFT losses against transformers + PEFT, merged 16-bit and 4-bit
export, and the CLIs, on tiny random models."""
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxvlm import FastVisionModel
from jaxvlm.lora import linear_modules
from jaxvlm.models.llava import LlavaForConditionalGeneration, Mistral3ForConditionalGeneration
from jaxvlm.quant import NF4
from jaxvlm.targets import get_peft_regex, select_modules
from tests.conftest import chat, random_image
from tests.test_gemma3 import hf_logits_at_positions
from tests.test_lora import _is_adapted, peft_adapted, with_random_b
from tests.test_mllama import bare
from tests.test_qwen2_vl_parity import assert_greedy_matches, assert_logits_match, encode, hf_logits, load
from tests.test_quantized_import import PROCESSOR_FILES, bnb_dequantized, weight
from tests.tiny import build_hf_model, save_tiny_processor

VARIANTS = ["llava", "llava_pixtral", "llava_next", "mistral3"]
MODEL_TYPE = {"llava": "llava", "llava_pixtral": "llava", "llava_next": "llava_next", "mistral3": "mistral3"}
PAD, EOS = 285, 287  # "<pad>", "</s>" in both tiny vocabularies
# Pixtral-12B is a `llava` whose checkpoint carries Mistral's chat template: its users name the markers (the
# family's defaults are LLaVA 1.5's).
MARKERS = {"llava_pixtral": {"instruction_part": "[INST]", "response_part": "[/INST]"}}


def build_llava_pixtral(seed=0):
    """Pixtral-12B's layout, tiny: `llava` with a Pixtral tower read at its last layer ("full"), the Mistral text
    model, the projector with biases; and its processor (PixtralProcessor, no patch merging)."""
    import transformers
    m3 = Mistral3ForConditionalGeneration.tiny_config("mistral3")
    config = transformers.LlavaConfig(
        text_config=m3.text_config.to_dict(), vision_config=m3.vision_config.to_dict(),
        image_token_id=Mistral3ForConditionalGeneration.TINY.special_tokens["[IMG]"], vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # as tests.tiny.build_hf_model randomises a family's model
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model


def save_variant(path, variant):
    if variant == "llava_pixtral":
        hf = build_llava_pixtral()
        hf.save_pretrained(path)
        save_tiny_processor(path, "mistral3")  # PixtralProcessor and Mistral's chat template, as pixtral-12b's
        config = json.loads((Path(path) / "processor_config.json").read_text())
        (Path(path) / "processor_config.json").write_text(json.dumps({**config, "spatial_merge_size": 1}))
        return hf
    hf = build_hf_model(variant)
    hf.save_pretrained(path)
    save_tiny_processor(path, variant)
    return hf


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request, tmp_path_factory):
    """(variant, model dir, transformers model), saved once for this module."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, str(path), save_variant(path, request.param)


@pytest.fixture(scope="module")
def loaded(tiny):
    variant, path, hf = tiny
    model, processor = load(path)
    return variant, model, processor, hf


def image_token(processor):
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def mixed_batch(processor, side="right"):
    """Two images of different sizes and aspect ratios in one sample, a text-only sample, one image in a third."""
    old = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = side
    try:
        texts = [chat("what is the difference", 2), chat("describe the picture in many words please"),
                 chat("and this", 1)]
        return encode(processor, texts, [random_image(50, 30, 1), random_image(20, 44, 2), random_image(56, 56, 3)])
    finally:
        processor.tokenizer.padding_side = old


def test_tiny_configs_use_the_switches_of_the_real_checkpoints(loaded):
    variant, model, processor, hf = loaded
    c, text = model.config, hf.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads and text.hidden_size % 2 == 0
    assert text.hidden_size & (text.hidden_size - 1)  # not a power of two
    if variant in ("llava", "llava_next"):  # LLaVA's: the second-to-last CLIP layer, no class token, quick_gelu
        assert hf.config.vision_feature_layer == -2 and c.feature_layers == (c.vision.num_layers - 1,)
        assert not c.keep_class_token and hf.config.vision_config.hidden_act == "quick_gelu"
    else:
        assert c.pixtral and c.keep_class_token
    if variant in ("llava_pixtral", "mistral3", "llava_next"):  # Mistral text: head_dim not hidden / heads
        assert text.head_dim * text.num_attention_heads != text.hidden_size
    if variant == "llava_next":
        assert len(hf.config.image_grid_pinpoints) >= 2
    if variant == "mistral3":
        assert c.spatial_merge_size == 2 and not c.projector_bias
    batch = mixed_batch(processor)
    assert "image_sizes" in batch or variant == "llava"


# -- 1. logits ----------------------------------------------------------------------------------------------------


def test_text_only(loaded):
    variant, model, processor, hf = loaded
    batch = encode(processor, [chat("what is this digit")])
    assert "pixel_values" not in batch
    assert_logits_match(model(**batch), hf_logits(hf, batch), batch["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_images_of_different_sizes_and_a_text_only_sample_with_padding(loaded, side):
    variant, model, processor, hf = loaded
    batch = mixed_batch(processor, side)
    pad_column = 0 if side == "left" else -1
    assert not batch["attention_mask"][:, pad_column].all()
    counts = (batch["input_ids"] == image_token(processor)).sum(axis=1)
    assert counts[1] == 0 and counts[0] > 0 and counts[2] > 0
    if variant in ("llava_pixtral", "mistral3"):  # images at their own sizes
        assert len({tuple(s) for s in batch["image_sizes"]}) == 3
    if variant == "llava_next":  # the images take different grids
        assert len({int(n) for n in (batch["pixel_values"].reshape(3, 5, -1).any(axis=2)).sum(axis=1)}) > 1
    assert_logits_match(model(**batch), hf_logits_at_positions(hf, batch), batch["attention_mask"])


def test_an_image_changes_the_logits(loaded):
    """The vision path matters in the tiny model (a projector or tower that gave nothing would pass the above)."""
    variant, model, processor, hf = loaded
    batch = encode(processor, [chat("and this", 1)], [random_image(56, 56, 3)])
    other = encode(processor, [chat("and this", 1)], [random_image(56, 56, 4)])
    a, b = np.asarray(model(**batch)), np.asarray(model(**other))
    assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-2 * np.abs(a).max()


# -- 2. generation ------------------------------------------------------------------------------------------------


def test_greedy_equals_transformers_for_a_left_padded_batch(loaded):
    variant, model, processor, hf = loaded
    assert_greedy_matches(model, hf, mixed_batch(processor, "left"), new_tokens=16, eos=EOS, pad=PAD)


@pytest.mark.parametrize("tiny", ["llava"], indirect=True)  # the Llama text model of every variant: one of them
def test_greedy_through_the_decode_attention_kernel_equals_transformers(loaded, decode_kernel_calls):
    """The decode steps through the Pallas decode-attention kernel (interpret mode; Llama's head_dim 16) give
    transformers' tokens. (Mistral 3's head_dim 20 is not a power of 2: its steps stay on XLA's path.)"""
    variant, model, processor, hf = loaded
    assert_greedy_matches(model, hf, mixed_batch(processor, "left"), new_tokens=16, eos=EOS, pad=PAD)
    assert sorted(set(decode_kernel_calls)) == list(range(model.config.text.num_layers))


@pytest.mark.parametrize("tiny", ["mistral3"], indirect=True)  # sampling is family-independent: one variant
def test_sampling_with_top_k_1_is_greedy_and_seeds_reproduce(loaded):
    variant, model, processor, hf = loaded
    batch = mixed_batch(processor, "left")
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    greedy = model.generate(**batch, **kw)
    np.testing.assert_array_equal(model.generate(**batch, **kw, do_sample=True, top_k=1), greedy)
    a, b, c = (model.generate(**batch, **kw, do_sample=True, temperature=1.5, top_p=0.95, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# -- 3. 4-bit -----------------------------------------------------------------------------------------------------


def test_load_in_4bit_quantizes_linear_weights_as_bitsandbytes_does(tiny):
    """Every Linear but the projector and lm_head (Unsloth's 16-bit modules) in NF4 with bitsandbytes' bytes, the
    towers' included; the logits then equal transformers' with bitsandbytes' dequantized weights."""
    import bitsandbytes.functional as F
    variant, path, hf = tiny
    model, processor = load(path, load_in_4bit=True)
    reference = copy.deepcopy(hf)
    quantized = []
    with torch.no_grad():
        for name, module in reference.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            ours = weight(model, name + ".weight")
            if name == "lm_head" or "multi_modal_projector" in name:
                assert not isinstance(ours, NF4), name
                continue
            assert isinstance(ours, NF4), name
            packed, state = F.quantize_4bit(module.weight.data.clone(), quant_type="nf4", compress_statistics=True,
                                            blocksize=64)
            np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().ravel(), err_msg=name)
            module.weight.copy_(bnb_dequantized(type("W", (), {"data": packed, "quant_state": state})))
            quantized.append(name)
    assert any("vision_tower" in n for n in quantized) and any("language_model" in n for n in quantized)
    batch = mixed_batch(processor)
    assert_logits_match(model(**batch), hf_logits_at_positions(reference, batch), batch["attention_mask"])


# Unsloth's "-bnb-4bit" LLaVA / Pixtral checkpoints keep these 16-bit; transformers 5 matches llm_int8_skip_modules
# from the start of a module's name or as its suffix, so the in-memory prefix too.
SKIPPED = ["lm_head", "multi_modal_projector", "model.multi_modal_projector"]


@pytest.mark.parametrize("tiny", ["llava", "mistral3"], indirect=True)  # one checkpoint per tower kind
def test_bnb_4bit_checkpoint_imports_as_nf4_with_bitsandbytes_logits(tiny, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    variant, path, hf = tiny
    quantized = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=SKIPPED)))
    quantized.save_pretrained(tmp_path)
    for name in PROCESSOR_FILES + ["processor_config.json"]:
        if (Path(path) / name).exists():
            shutil.copy(Path(path) / name, tmp_path)
    reference, modules = copy.deepcopy(hf).eval(), dict(quantized.named_modules())
    n = 0
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(modules.get(name), bnb.nn.Linear4bit):
                module.weight.copy_(bnb_dequantized(modules[name].weight))
                n += 1
    model, processor = load(str(tmp_path), load_in_4bit=True)
    tower = "encoder.layers.1.self_attn.q_proj" if variant == "llava" else "transformer.layers.1.attention.q_proj"
    for key in (f"model.vision_tower.{tower}.weight", "model.language_model.layers.1.mlp.down_proj.weight"):
        assert isinstance(weight(model, key), NF4), key
        assert isinstance(modules[key.removesuffix(".weight")], bnb.nn.Linear4bit), key
    assert n > 4 and not isinstance(weight(model, "model.multi_modal_projector.linear_1.weight"), NF4)
    batch = mixed_batch(processor)
    assert_logits_match(model(**batch), hf_logits_at_positions(reference, batch), batch["attention_mask"])


# -- 4. LoRA ------------------------------------------------------------------------------------------------------


# Unsloth's flags on every variant (all on), their combinations on one.
FLAGS = [("tiny", "flags"), [*((v, (True, True, True, True)) for v in VARIANTS),
                             *(("llava", f) for f in ((False, True, True, True), (True, False, True, False),
                                                      (True, True, False, True)))]]


@pytest.mark.parametrize(*FLAGS, indirect=["tiny"])
def test_adapted_modules_equal_peft_with_unsloths_regex(loaded, flags):
    variant, model, processor, hf = loaded
    vision, language, attention, mlp = flags
    names = list(linear_modules(model))
    assert set(names) == {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    regex = get_peft_regex(names, vision, language, attention, mlp)
    adapted = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=vision,
                                             finetune_language_layers=language, finetune_attention_modules=attention,
                                             finetune_mlp_modules=mlp)
    ours = {name for name, (param, layer) in linear_modules(adapted).items() if _is_adapted(adapted, param, layer)}
    assert ours == set(select_modules(names, regex)) == peft_adapted(copy.deepcopy(hf), regex)
    assert not any("multi_modal_projector" in n for n in ours)


def test_our_adapter_loads_in_peft_and_back_with_equal_logits(loaded, tmp_path):
    from peft import PeftModel
    variant, model, processor, hf = loaded
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4, lora_alpha=8))
    batch = mixed_batch(processor)
    logits = np.asarray(adapted(**batch))
    assert np.abs(logits - hf_logits_at_positions(hf, batch)).max() > 1e-2, "the adapter should change the logits"
    adapted.save_pretrained(str(tmp_path / "adapter"), processor)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "adapter")).eval()
    assert_logits_match(logits, hf_logits_at_positions(peft_model, batch), batch["attention_mask"])
    assert_logits_match(model.load_adapter(str(tmp_path / "adapter"))(**batch), logits, batch["attention_mask"])


@pytest.mark.parametrize("tiny", ["llava_next"], indirect=True)  # family-independent: one variant
def test_a_peft_made_adapter_loads_here(loaded, tmp_path):
    from peft import LoraConfig, get_peft_model
    variant, model, processor, hf = loaded
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1",
                                                                                                  "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    batch = mixed_batch(processor)
    assert_logits_match(model.load_adapter(str(tmp_path / "adapter"))(**batch),
                        hf_logits_at_positions(peft_model.eval(), batch), batch["attention_mask"])


# -- 5. data and training -----------------------------------------------------------------------------------------


def record(n_images, question, answer, seed=0):
    content = [*({"type": "image", "image": random_image(40 + 9 * i, 30 + 13 * i, seed=seed + i)}
                 for i in range(n_images)), {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


# 2 + 0 + 3 images: a bucket of 6, one padding image.
RECORDS = [record(2, "what are these", "two red digits"), record(0, "say hello", "hello"),
           record(3, "describe the images", "blue photos", 10)]


def test_collator_unpadded_batch_equals_the_processor(loaded):
    from jaxvlm.train import VisionDataCollator
    variant, model, processor, hf = loaded
    batch = VisionDataCollator(model, processor, pad_to_bucket=False, resize=None)(RECORDS)
    texts = [processor.apply_chat_template(bare(r["messages"]), tokenize=False) for r in RECORDS]
    images = [c["image"] for r in RECORDS for c in r["messages"][0]["content"] if c["type"] == "image"]
    ref = processor(text=texts, images=images, padding=True, return_tensors="np", add_special_tokens=False)
    assert set(batch) == set(ref) | {"labels"}
    for key, value in ref.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)


def test_collator_buckets_and_keeps_the_logits(loaded):
    """Bucketed: the tokens to a bucket, the images padded to a bucket of whole images (each padded to the model's largest
    image or tile count: Pixtral's and LLaVA-NeXT's rows differ in size), image_sizes for the real images; the
    logits equal the unpadded batch's; only the answers are trained on (the family's markers by default)."""
    from jaxvlm.train import VisionDataCollator, bucket_size
    variant, model, processor, hf = loaded
    markers = MARKERS.get(variant, {})
    batch = VisionDataCollator(model, processor, train_on_responses_only=True, **markers)(RECORDS)
    unpadded = VisionDataCollator(model, processor, pad_to_bucket=False)(RECORDS)
    n = unpadded["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] == bucket_size(n) and batch["n_pad_patches"] == 1
    assert batch["pixel_values"].shape[0] == 6 and not batch["pixel_values"][5].any()
    assert batch["pixel_values"].shape[1:] == model.pixel_row_shape(processor.image_processor)
    if "image_sizes" in unpadded:
        np.testing.assert_array_equal(batch["image_sizes"], unpadded["image_sizes"])
    labels = batch["labels"]
    assert (labels != -100).any(axis=1).all()
    for ids, row in zip(batch["input_ids"], labels):  # nothing before the response marker is trained
        first = np.flatnonzero(row != -100)[0]
        response = markers.get("response_part", model.INFO.response_part)
        assert ids[first - 1] in processor.tokenizer(response, add_special_tokens=False)["input_ids"]
    ours = np.asarray(model(**{k: v for k, v in batch.items() if k != "labels"}))[:, :n]
    assert_logits_match(ours, np.asarray(model(**{k: v for k, v in unpadded.items() if k != "labels"})),
                        unpadded["attention_mask"])


# The CLIP tower with anyres packing, the Pixtral tower with the patch merger (the other two variants' forward and
# LoRA paths are these without the packing / the merger; their logits and adapters are tested above).
@pytest.mark.parametrize("tiny", ["llava_next", "mistral3"], indirect=True)
def test_lora_sft_losses_equal_transformers_and_peft_for_3_steps(tiny, tmp_path):
    """Our collator (the family's markers), SFTTrainer and LoRA on the vision and language layers, against
    transformers + PEFT + torch AdamW from the same init on the same batches (records with and without images)."""
    from peft import PeftModel
    from jaxvlm.train import VisionDataCollator
    from jaxvlm.train.trainer import SFTConfig, SFTTrainer
    from tests.test_trainer import train_and_compare_with_peft
    variant, path, hf = tiny
    model, processor = load(path)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    model.save_pretrained(str(tmp_path / "init"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "init"), is_trainable=True)
    data = [record(1, "which digit is this", f"the digit is {i}", seed=i) for i in range(6)]
    data[3] = record(0, "say a digit", "three")
    args = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=3, learning_rate=5e-3,
                     warmup_steps=1, weight_decay=0.01, optim="adamw_torch", output_dir=str(tmp_path / "out"), seed=0)
    collator = VisionDataCollator(model, processor, train_on_responses_only=True, **MARKERS.get(variant, {}))
    trainer = SFTTrainer(model, processor, collator, data, args=args)
    train_and_compare_with_peft(trainer, peft_model, 3)


# -- 6. export ----------------------------------------------------------------------------------------------------


def test_merged_16bit_export_loads_in_transformers_with_our_logits(loaded, tmp_path):
    import transformers
    variant, model, processor, hf = loaded
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4))
    batch = mixed_batch(processor)
    logits = np.asarray(adapted(**batch))
    adapted.save_pretrained_merged(str(tmp_path / "out"), processor, save_method="merged_16bit")
    merged = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(merged) is type(hf)
    assert_logits_match(logits, hf_logits_at_positions(merged.eval(), batch), batch["attention_mask"])
    again, _ = load(str(tmp_path / "out"))
    assert_logits_match(again(**batch), logits, batch["attention_mask"])


@pytest.mark.parametrize("tiny", ["mistral3"], indirect=True)  # the export is family-independent: one variant
def test_merged_4bit_export_loads_in_transformers_with_bitsandbytes(loaded, tmp_path):
    import bitsandbytes as bnb
    import transformers
    from jaxvlm.layers import dense_weight
    variant, model, processor, hf = loaded
    model.save_pretrained_merged(str(tmp_path / "q4"), processor, save_method="merged_4bit")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    exported = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "q4", dtype=torch.float32)
    quantized = {n: m for n, m in exported.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    linears = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(quantized) == sorted(n for n in linears if n != "lm_head" and "multi_modal_projector" not in n)
    ours, _ = load(str(tmp_path / "q4"), load_in_4bit=True)
    for name, module in quantized.items():
        w = weight(ours, name + ".weight")
        assert isinstance(w, NF4), name
        np.testing.assert_array_equal(np.asarray(dense_weight(w, np.float32)), bnb_dequantized(module.weight).numpy())


@pytest.mark.parametrize("tiny", ["mistral3"], indirect=True)  # the CLIs are family-independent: one round trip
def test_train_export_and_generate_clis(tiny, tmp_path, capsys):
    from tests.test_cli import check_train_generate_export
    variant, path, hf = tiny
    check_train_generate_export(path, MODEL_TYPE[variant], tmp_path, capsys)


@pytest.mark.parametrize("tiny", ["llava"], indirect=True)
def test_config_errors_name_the_field(tiny):
    import transformers
    from jaxvlm.models.base import ConfigError
    variant, path, hf = tiny
    config = transformers.AutoConfig.from_pretrained(path)
    config.vision_config.model_type = "siglip_vision_model"
    with pytest.raises(ConfigError, match="vision_config.model_type='siglip_vision_model'"):
        LlavaForConditionalGeneration.config_from_hf(config)
    pixtral = transformers.LlavaConfig(text_config=config.text_config.to_dict(), vision_config={
        "model_type": "pixtral", "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 56, "patch_size": 7}, vision_feature_layer=-2)
    with pytest.raises(ConfigError, match="vision_feature_layer=-2"):
        LlavaForConditionalGeneration.config_from_hf(pixtral)


def test_engine_gives_each_request_the_tokens_of_generate(loaded):
    from tests.test_engine import check_decode_writes_the_cache_in_place, check_engine_matches_generate
    variant, model, processor, _ = loaded
    check_engine_matches_generate(model, processor, pad=PAD)
    check_decode_writes_the_cache_in_place(model)
