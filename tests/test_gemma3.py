"""Gemma 3 (vision) through the family seam: transformers' fp32 logits (text only, images, several images,
padding on both sides, sequences longer than the sliding window, pan-and-scan crops), greedy and seeded
generation, 4-bit (load_in_4bit and bitsandbytes checkpoints), LoRA targets and PEFT adapters both ways, the
collator with Gemma's chat markers, LoRA SFT losses against transformers + PEFT, merged 16-bit and 4-bit
export, and the CLIs, on a tiny random model whose config switches on what the real checkpoints use."""
import copy
import json
import shutil

import jax.numpy as jnp
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

FAMILY = "gemma3"
PAD, EOS = 285, 292  # the tiny tokenizer's "<pad>" and "<end_of_turn>" (Gemma 3's eos)
IMAGE_TOKEN = 290  # "<image_soft_token>"
USER, MODEL = "<start_of_turn>user\n", "<start_of_turn>model\n"
# Unsloth's Gemma 3 "-bnb-4bit" checkpoints keep these 16-bit (llm_int8_skip_modules in their config.json).
SKIPPED = ["lm_head", "multi_modal_projector", "vision_tower"]
# transformers 5 matches llm_int8_skip_modules from the start of a module's name or as its suffix (not anywhere in
# it, as 4.x did): the in-memory prefixes too, so that it keeps them 16-bit when it quantizes.
SKIPPED_V5 = SKIPPED + ["model.multi_modal_projector", "model.vision_tower"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, transformers model) of the tiny Gemma 3, saved once for this module."""
    path = tmp_path_factory.mktemp(FAMILY)
    return str(path), save_tiny_model(path, FAMILY)


@pytest.fixture(scope="module")
def loaded(tiny):
    path, hf_model = tiny
    model, processor = load(path)
    return model, processor, hf_model


def positions(attention_mask):
    """Position ids counting real tokens only (what transformers' generate passes; ours always does this)."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)


def hf_logits_at_positions(hf_model, batch):
    return hf_logits(hf_model, {**batch, "position_ids": positions(batch["attention_mask"])})


def padded_batch(processor, side):
    texts = [chat("describe the image", 1), chat("what is this digit in the image then tell me why", 1)]
    old = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = side
    try:
        # Gemma3Processor takes the images of a batch per sample.
        return encode(processor, texts, [[random_image(56, 56, seed=3)], [random_image(84, 40, seed=4)]])
    finally:
        processor.tokenizer.padding_side = old


def one_image_batch(processor):
    return encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])


def test_tiny_config_uses_the_switches_of_the_real_checkpoints(loaded):
    model, processor, hf_model = loaded
    text = hf_model.config.text_config
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    assert text.head_dim * text.num_attention_heads != text.hidden_size
    assert text.query_pre_attn_scalar != text.head_dim
    assert text.num_key_value_heads < text.num_attention_heads
    assert text.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert text.rope_parameters["full_attention"]["factor"] != 1.0
    assert text.rope_parameters["sliding_attention"]["rope_theta"] != text.rope_parameters["full_attention"][
        "rope_theta"]
    assert any(k.endswith("self_attn.q_norm.weight") for k in hf_model.state_dict())
    # The window is shorter than every test sequence, and longer than an image's tokens.
    batch = one_image_batch(processor)
    assert hf_model.config.mm_tokens_per_image < text.sliding_window < batch["input_ids"].shape[1]
    assert (batch["input_ids"] == IMAGE_TOKEN).sum() == hf_model.config.mm_tokens_per_image
    # Ours read the same switches.
    cfg = model.config.text
    assert cfg.sliding == tuple(k == "sliding_attention" for k in text.layer_types)
    assert cfg.sliding_window == text.sliding_window and cfg.rope_global_factor == 8.0
    assert cfg.query_pre_attn_scalar == text.query_pre_attn_scalar and cfg.head_dim == text.head_dim


# -- 1. logits --------------------------------------------------------------------------------------


def test_text_only(loaded):
    model, processor, hf_model = loaded
    batch = encode(processor, [chat("what is this digit")])
    assert "pixel_values" not in batch
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_one_image(loaded):
    model, processor, hf_model = loaded
    batch = one_image_batch(processor)
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    np.testing.assert_array_equal(batch["token_type_ids"], batch["input_ids"] == IMAGE_TOKEN)
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_image_tokens_attend_to_each_other_both_ways(loaded):
    """Without token_type_ids transformers masks image tokens causally; with them (as the processor gives),
    each image's tokens see each other: the logits at the image differ, and ours follow the latter."""
    model, processor, hf_model = loaded
    batch = one_image_batch(processor)
    without = {k: v for k, v in batch.items() if k != "token_type_ids"}
    ref = hf_logits(hf_model, batch)
    at_image = batch["input_ids"] == IMAGE_TOKEN
    causal = hf_logits(hf_model, without)
    assert np.abs(causal[at_image] - ref[at_image]).max() > 1e-2 * np.abs(ref).max()
    assert_logits_match(model(**batch), ref, batch["attention_mask"])


def test_two_images_in_one_sample(loaded):
    model, processor, hf_model = loaded
    images = [random_image(56, 84, seed=1), random_image(112, 56, seed=2)]
    batch = encode(processor, [chat("what is the difference", 2)], images)
    assert batch["pixel_values"].shape[0] == 2 and (batch["input_ids"] == IMAGE_TOKEN).sum() == 8
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_of_two_with_padding(loaded, side):
    model, processor, hf_model = loaded
    batch = padded_batch(processor, side)
    pad_column = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, pad_column] == 0).any(), f"one prompt should be {side}-padded"
    assert batch["pixel_values"].shape[0] == 2
    assert_logits_match(model(**batch), hf_logits_at_positions(hf_model, batch), batch["attention_mask"])


def test_sequence_longer_than_the_sliding_window_with_an_image(loaded):
    """Text before and after an image block in a sequence several windows long; transformers with a window
    wider than the sequence gives other logits (so the window is in force)."""
    import transformers
    model, processor, hf_model = loaded
    messages = [{"role": "system", "content": [{"type": "text", "text": "you are a helpful assistant"}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "please look at this picture of a digit and tell me what it shows"},
                    {"type": "image"},
                    {"type": "text", "text": "which number is it, what color is it and where is it in the image"}]}]
    batch = encode(processor, [messages], [random_image(60, 44, seed=5)])
    ids = batch["input_ids"][0]
    window = hf_model.config.text_config.sliding_window
    first_image = int(np.flatnonzero(ids == IMAGE_TOKEN)[0])
    assert first_image > 2 * window and len(ids) - first_image > 2 * window
    ref = hf_logits(hf_model, batch)
    assert_logits_match(model(**batch), ref, batch["attention_mask"])
    wide = copy.deepcopy(hf_model.config)
    wide.text_config.sliding_window = 4 * len(ids)
    unwindowed = transformers.Gemma3ForConditionalGeneration(wide).eval()
    unwindowed.load_state_dict(hf_model.state_dict())
    assert np.abs(hf_logits(unwindowed, batch) - ref).max() > 1e-2 * np.abs(ref).max()


@pytest.fixture
def pallas_attention(monkeypatch):
    """The Pallas attention kernel for Gemma's masks (interpret mode on the CPU), programs traced afresh."""
    import jax
    from jaxvlm import layers
    jax.clear_caches()
    monkeypatch.setattr(layers, "attention_implementation", "pallas")
    yield
    monkeypatch.undo()
    jax.clear_caches()


def test_the_pallas_attention_kernel_gives_transformers_logits_and_the_xla_gradients(loaded, pallas_attention):
    """The GPU's path (the mask made tile by tile from key_ok / image runs / the window, in a lax.cond per layer
    kind) on the CPU: a left-padded batch with images, longer than two windows, gives transformers' logits; the LoRA
    gradients of a loss equal those of the dense-mask path."""
    import jax
    from jaxvlm import layers
    model, processor, hf_model = loaded
    batch = padded_batch(processor, "left")
    assert batch["input_ids"].shape[1] > 2 * hf_model.config.text_config.sliding_window  # the window is in force
    assert_logits_match(model(**batch), hf_logits_at_positions(hf_model, batch), batch["attention_mask"])

    from jaxvlm.kernels.cross_entropy import token_loss_sum
    from jaxvlm.train.trainer import split_trainable
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0))
    batch = padded_batch(processor, "right")  # as the collator pads (a left-padded row's first target would be
    # predicted from a padding query, whose output no path defines)
    inputs = {k: jnp.asarray(v) for k, v in adapted.prepare_inputs(**batch).items()}
    labels = jnp.asarray(np.where(batch["attention_mask"] > 0, batch["input_ids"], -100))
    trainable, frozen, rebuild, _ = split_trainable(adapted, lambda p: p[-1].name in ("lora_A", "lora_B"))

    def grads():
        def loss(t):
            s, n = token_loss_sum(rebuild(t, frozen).forward(inputs), labels)
            return s / n
        return jax.jit(jax.grad(loss))(trainable)

    ours = grads()
    layers.attention_implementation = "xla"
    jax.clear_caches()
    ref = grads()
    leaves = jax.tree.leaves(ref)
    assert leaves
    for a, b in zip(jax.tree.leaves(ours), leaves):
        scale = float(jnp.abs(b).max())
        assert scale > 0 and float(jnp.abs(a - b).max()) <= 1e-4 * scale


def test_pan_and_scan_crops(loaded):
    """A wide image with do_pan_and_scan=True: the image and its crops, each its own image block. (Gemma3Processor's
    own pan-and-scan defaults, min crop 256 pixels, override the image processor's config: a 900 x 300 image.)"""
    model, processor, hf_model = loaded
    images = [random_image(900, 300, seed=6)]
    prompt = processor.apply_chat_template(chat("describe the image", 1), tokenize=False, add_generation_prompt=True)
    batch = dict(processor(text=[prompt], images=images, do_pan_and_scan=True, return_tensors="np"))
    n_images = batch["pixel_values"].shape[0]
    assert n_images == 4, "pan and scan should add 3 crops"
    assert (batch["input_ids"] == IMAGE_TOKEN).sum() == 4 * n_images
    np.testing.assert_array_equal(batch["token_type_ids"], batch["input_ids"] == IMAGE_TOKEN)
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_float16_warns_and_gives_bfloat16(tiny):
    path, hf_model = tiny
    with pytest.warns(UserWarning, match="float16"):
        model, processor = FastVisionModel.from_pretrained(path, dtype="float16", load_in_4bit=False)
    assert model.dtype == jnp.bfloat16
    assert model.model.language_model.layers.mlp.down_proj.weight.get_value().dtype == jnp.bfloat16
    batch = one_image_batch(processor)
    logits = np.asarray(model(**batch)).astype(np.float32)
    ref = hf_logits(hf_model, batch)
    assert np.isfinite(logits).all()
    # As close to the fp32 logits as transformers' own bf16 run is (the tiny model's sharp attention, q/k weights
    # x8, makes bf16 rounding show).
    hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    tensors["pixel_values"] = tensors["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        theirs = hf16(**tensors).logits.float().numpy()
    err, their_err = np.abs(logits - ref).max(), np.abs(theirs - ref).max()
    print(f"bf16 max error: ours {err:.3g}, transformers' {their_err:.3g} (logit scale {np.abs(ref).max():.3g})")
    assert err <= 2 * their_err + 0.01 * np.abs(ref).max()


# -- 2. generation ----------------------------------------------------------------------------------


def test_greedy_equals_transformers_for_a_left_padded_batch_with_images(loaded):
    model, processor, hf_model = loaded
    batch = padded_batch(processor, "left")
    assert (batch["attention_mask"][:, 0] == 0).any()
    assert_greedy_matches(model, hf_model, batch, new_tokens=20, eos=EOS, pad=PAD)


def test_greedy_with_the_decode_step_as_a_scan_equals_transformers(loaded, monkeypatch):
    """A decode step traced as a scan over the layers (each layer's kind traced: both caches written, a lax.cond per
    layer), as `model.decode` runs outside generation's unrolled step: transformers' tokens too."""
    import contextlib

    import jax

    import jaxvlm.generate
    model, processor, hf_model = loaded
    monkeypatch.setattr(jaxvlm.generate, "unrolled_layers", contextlib.nullcontext)
    jax.clear_caches()
    try:
        assert_greedy_matches(model, hf_model, padded_batch(processor, "left"), new_tokens=12, eos=EOS, pad=PAD)
    finally:
        jax.clear_caches()


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


@pytest.fixture(scope="module")
def kernel_sized(tmp_path_factory):
    """A tiny Gemma 3 whose decode steps the decode-attention kernel takes (head_dim 32, a power of 2; a 16-slot
    sliding window: the rings' slots a multiple of 16)."""
    path = tmp_path_factory.mktemp(FAMILY + "-kernel")
    hf_model = save_tiny_model(path, FAMILY, head_dim=32, sliding_window=16)
    model, processor = load(str(path))
    return model, processor, hf_model


def test_greedy_through_the_decode_attention_kernel_equals_transformers(kernel_sized, decode_kernel_calls):
    """Generation's step knows each layer's kind: a global layer's step through the Pallas kernel over its cache, a
    sliding one's over its ring (written at the slot modulo the ring, masked to the window), transformers' tokens
    with prompts longer than the window (the rings wrap)."""
    model, processor, hf_model = kernel_sized
    batch = padded_batch(processor, "left")
    assert batch["input_ids"].shape[1] > 16
    assert_greedy_matches(model, hf_model, batch, new_tokens=20, eos=EOS, pad=PAD)
    sliding = np.asarray(model.config.text.sliding)
    global_slots = 64 * -(-(batch["input_ids"].shape[1] + 20) // 64)  # generate's cache length
    expected = {(i, 16) for i in range(sliding.sum())} | {(i, global_slots) for i in range((~sliding).sum())}
    assert set(zip(decode_kernel_calls, decode_kernel_calls.slots)) == expected


# -- 3. 4-bit ---------------------------------------------------------------------------------------


def test_load_in_4bit_quantizes_linear_weights_outside_quant_skip_as_bitsandbytes_does(tiny):
    import bitsandbytes.functional as F
    path, hf_model = tiny
    model, processor = load(path, load_in_4bit=True)
    assert set(type(model).INFO.quant_skip) == set(SKIPPED)
    reference = copy.deepcopy(hf_model)
    quantized, kept = [], []
    with torch.no_grad():
        for name, module in reference.named_modules():
            if not isinstance(module, torch.nn.Linear) or name == "lm_head":
                continue
            ours = weight(model, name + ".weight")
            if ".vision_tower." in name:
                assert not isinstance(ours, NF4), name
                np.testing.assert_array_equal(np.asarray(ours), module.weight.numpy(), err_msg=name)
                kept.append(name)
                continue
            assert isinstance(ours, NF4), name
            packed, state = F.quantize_4bit(module.weight.data.clone(), quant_type="nf4", compress_statistics=True,
                                            blocksize=64)
            np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().ravel())
            module.weight.copy_(bnb_dequantized(type("W", (), {"data": packed, "quant_state": state})))
            quantized.append(name)
    assert any(".language_model.layers.3.mlp.down_proj" in n for n in quantized)
    assert any(".vision_tower.encoder.layers.1.mlp.fc2" in n for n in kept)
    # lm_head is tied to the embedding, which stays 16-bit; so do the projector and the patch embedding.
    assert model.lm_head is None
    assert not isinstance(model.model.language_model.embed_tokens.weight.get_value(), NF4)
    assert not isinstance(model.model.multi_modal_projector.mm_input_projection_weight.get_value(), NF4)
    assert not isinstance(model.model.vision_tower.embeddings.patch_embedding.weight.get_value(), NF4)
    batch = one_image_batch(processor)
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


def test_load_in_4bit_keeps_an_untied_lm_head_16bit(tmp_path):
    hf_model = save_tiny_model(tmp_path, FAMILY, tie_word_embeddings=False)
    assert not hf_model.config.tie_word_embeddings
    assert not torch.equal(hf_model.lm_head.weight, hf_model.model.language_model.embed_tokens.weight)
    model, processor = load(str(tmp_path))
    batch = one_image_batch(processor)
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])
    model4, _ = load(str(tmp_path), load_in_4bit=True)
    lm_head = weight(model4, "lm_head.weight")
    assert not isinstance(lm_head, NF4)
    np.testing.assert_array_equal(np.asarray(lm_head), hf_model.lm_head.weight.detach().numpy())
    assert isinstance(weight(model4, "model.language_model.layers.0.self_attn.q_proj.weight"), NF4)


@pytest.fixture(scope="module")
def bnb_checkpoint(tiny, tmp_path_factory):
    """(dir of the tiny Gemma 3 quantized + saved by transformers + bitsandbytes, keeping Unsloth's 16-bit
    modules, the float model with bitsandbytes' dequantization of each 4-bit weight)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    path, hf_model = tiny
    quantized = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=SKIPPED_V5)))
    out = tmp_path_factory.mktemp(f"{FAMILY}-bnb4")
    quantized.save_pretrained(out)
    for name in PROCESSOR_FILES + ["processor_config.json"]:
        shutil.copy(f"{path}/{name}", out)
    reference = copy.deepcopy(hf_model).eval()
    modules = dict(quantized.named_modules())
    n = 0
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(modules.get(name), bnb.nn.Linear4bit):
                assert ".vision_tower." not in name, name
                module.weight.copy_(bnb_dequantized(modules[name].weight))
                n += 1
    assert n == 4 * 7  # the language model's q, k, v, o, gate, up, down in each of its 4 layers
    return str(out), reference


def test_bnb_4bit_checkpoint_imports_as_nf4_with_bitsandbytes_logits(bnb_checkpoint):
    path, reference = bnb_checkpoint
    config = json.loads(open(f"{path}/config.json").read())
    assert set(SKIPPED) <= set(config["quantization_config"]["llm_int8_skip_modules"])
    model, processor = load(path, load_in_4bit=True)
    for key in ("model.language_model.layers.0.mlp.down_proj.weight",
                "model.language_model.layers.1.self_attn.q_proj.weight"):
        assert isinstance(weight(model, key), NF4), key
    for key in ("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
                "model.vision_tower.encoder.layers.1.mlp.fc1.weight"):
        w = weight(model, key)
        assert not isinstance(w, NF4), key
        np.testing.assert_array_equal(np.asarray(w), reference.get_parameter(key).detach().numpy(), err_msg=key)
    batch = one_image_batch(processor)
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


# -- 4. LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision,language,attention,mlp", [
    (True, True, True, True), (True, False, True, False), (False, True, False, True), (True, True, False, True),
    (False, True, True, True)])
def test_adapted_modules_equal_peft_with_unsloths_regex(loaded, vision, language, attention, mlp):
    model, processor, hf_model = loaded
    flags = dict(finetune_vision_layers=vision, finetune_language_layers=language,
                 finetune_attention_modules=attention, finetune_mlp_modules=mlp)
    names = list(linear_modules(model))
    assert "model.vision_tower.encoder.layers.1.mlp.fc1" in names
    assert "model.language_model.layers.3.self_attn.o_proj" in names
    regex = get_peft_regex(names, vision, language, attention, mlp)
    adapted = FastVisionModel.get_peft_model(model, r=2, **flags)
    ours = {name for name, (param, layer) in linear_modules(adapted).items() if _is_adapted(adapted, param, layer)}
    expected = {n for n in names
                if ((vision and ".vision_tower." in n) or (language and ".language_model." in n))
                and ((attention and ".self_attn." in n) or (mlp and ".mlp." in n))}
    assert ours == expected
    assert ours == set(select_modules(names, regex))
    assert ours == peft_adapted(copy.deepcopy(hf_model), regex)


def test_our_adapter_loads_in_peft_with_our_logits(loaded, tmp_path):
    from peft import PeftModel
    model, processor, hf_model = loaded
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4, lora_alpha=8))
    adapted.save_pretrained(str(tmp_path / "adapter"), processor)
    batch = one_image_batch(processor)
    ours = np.asarray(adapted(**batch))
    assert np.abs(ours - hf_logits(hf_model, batch)).max() > 1e-2, "the adapter should change the logits"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "adapter")).eval()
    assert_logits_match(ours, hf_logits(peft_model, batch), batch["attention_mask"])


def test_peft_adapter_loads_here_with_peft_logits(loaded, tmp_path):
    from peft import LoraConfig, get_peft_model
    model, processor, hf_model = loaded
    regex = get_peft_regex(list(linear_modules(model)))
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=4, lora_alpha=16, target_modules=regex, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    batch = one_image_batch(processor)
    ref = hf_logits(peft_model.eval(), batch)
    assert np.abs(np.asarray(model(**batch)) - ref).max() > 1e-2, "the adapter should change the logits"
    # model.load_adapter is jaxvlm.converters.peft_adapter.load_adapter(model, dir)
    assert_logits_match(model.load_adapter(str(tmp_path))(**batch), ref, batch["attention_mask"])


# -- 5. data and training ---------------------------------------------------------------------------


def record(n_images, question, answer, seed=0):
    content = [*({"type": "image", "image": random_image(40 + 9 * i, 30 + 5 * i, seed=seed + i)}
                 for i in range(n_images)), {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def bare(messages):
    """The messages with each image item reduced to {"type": "image"}."""
    return [{**m, "content": [{"type": "image"} if c["type"] == "image" else c for c in m["content"]]}
            for m in messages]


RECORDS = [record(1, "what is this", "a red digit"), record(4, "describe the four images", "four blue photos", 10)]


def test_collator_unpadded_batch_equals_the_processor(loaded):
    from jaxvlm.train import UnslothVisionDataCollator, VisionDataCollator
    model, processor, hf_model = loaded
    assert UnslothVisionDataCollator is VisionDataCollator
    batch = UnslothVisionDataCollator(model, processor, pad_to_bucket=False, resize=None)(RECORDS)
    texts = [processor.apply_chat_template(bare(r["messages"]), tokenize=False) for r in RECORDS]
    images = [[c["image"] for c in r["messages"][0]["content"] if c["type"] == "image"] for r in RECORDS]
    ref = processor(text=texts, images=images, padding=True, return_tensors="np", add_special_tokens=False)
    assert set(batch) == set(ref) | {"labels"} and "token_type_ids" in batch and "mm_token_type_ids" not in batch
    for key, value in ref.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)


def test_collator_with_gemma_markers_pads_whole_images_and_carries_token_type_ids(loaded):
    from jaxvlm.train import UnslothVisionDataCollator
    model, processor, hf_model = loaded
    collator = UnslothVisionDataCollator(model, processor, train_on_responses_only=True,
                                         instruction_part=USER, response_part=MODEL)
    batch = collator(RECORDS)
    # The family's markers are the default.
    default = UnslothVisionDataCollator(model, processor, train_on_responses_only=True)(RECORDS)
    np.testing.assert_array_equal(default["labels"], batch["labels"])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[1] == 64 and (mask == 0).any()
    # 5 images pad to the bucket of 6 whole images (PIXEL_BUCKET_MIN = 1): one zero image at the end.
    assert batch["pixel_values"].shape == (6, 3, 28, 28) and batch["n_pad_patches"] == 1
    assert not batch["pixel_values"][-1].any() and batch["pixel_values"][:-1].any(axis=(1, 2, 3)).all()
    np.testing.assert_array_equal(batch["token_type_ids"], (ids == IMAGE_TOKEN) & (mask == 1))
    marker = processor.tokenizer(MODEL, add_special_tokens=False)["input_ids"]
    for row_ids, row_labels, row_mask in zip(ids, labels, mask):
        starts = [i + len(marker) for i in range(len(row_ids)) if list(row_ids[i:i + len(marker)]) == marker]
        assert len(starts) == 1
        trained = np.zeros(len(row_ids), bool)
        trained[starts[0]:row_mask.sum()] = True
        np.testing.assert_array_equal(row_labels != -100, trained)
        np.testing.assert_array_equal(row_labels[trained], row_ids[trained])
        tail = processor.tokenizer.convert_ids_to_tokens(row_ids[trained][-2:].tolist())
        assert tail == ["<end_of_turn>", "\n"]
    # The padded batch (a zero image at the end, right padding) gives the unpadded batch's logits.
    unpadded = UnslothVisionDataCollator(model, processor, pad_to_bucket=False)(RECORDS)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = np.asarray(model(**{k: v for k, v in unpadded.items() if k != "labels"}))
    n = unpadded["input_ids"].shape[1]
    assert_logits_match(np.asarray(model(**inputs))[:, :n], ref, unpadded["attention_mask"])
    assert_logits_match(ref, hf_logits(hf_model, {k: v for k, v in unpadded.items() if k != "labels"}),
                        unpadded["attention_mask"])


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
    first = trainer.micro_batch(0)[0]
    labels = first["labels"]
    assert 0 < (labels != -100).sum() < labels.size // 4, "only the model's answer is trained on"
    assert "token_type_ids" in first and first["token_type_ids"].sum() == 4 * len(labels)
    train_and_compare_with_peft(trainer, peft_model, 3)


# -- 6. export and CLIs -----------------------------------------------------------------------------


def test_merged_16bit_export_has_the_hubs_keys_and_loads_in_transformers_with_our_logits(loaded, tmp_path):
    import transformers
    from safetensors.numpy import load_file
    model, processor, hf_model = loaded
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4, lora_alpha=8))
    batch = one_image_batch(processor)
    ours = np.asarray(adapted(**batch))
    assert np.abs(ours - hf_logits(hf_model, batch)).max() > 1e-2, "the adapter should change the logits"
    adapted.save_pretrained_merged(str(tmp_path / "out"), processor, save_method="merged_16bit")
    keys = set()
    for file in (tmp_path / "out").glob("*.safetensors"):
        keys |= set(load_file(str(file)))
    prefixes = ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.")
    assert keys and all(k.startswith(prefixes) for k in keys), sorted(k for k in keys if not k.startswith(prefixes))
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "language_model.model.layers.3.mlp.down_proj.weight" in keys
    assert "vision_tower.vision_model.encoder.layers.1.self_attn.out_proj.weight" in keys
    assert "multi_modal_projector.mm_input_projection_weight" in keys
    merged = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert_logits_match(ours, hf_logits(merged.eval(), batch), batch["attention_mask"])
    again, _ = load(str(tmp_path / "out"))
    assert_logits_match(again(**batch), ours, batch["attention_mask"])


def test_merged_4bit_export_loads_in_transformers_with_bitsandbytes(loaded, tmp_path):
    import bitsandbytes as bnb
    import transformers
    from jaxvlm.layers import dense_weight
    model, processor, hf_model = loaded
    model.save_pretrained_merged(str(tmp_path / "q4"), processor, save_method="merged_4bit")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    exported = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "q4", dtype=torch.float32)
    assert type(exported).__name__ == "Gemma3ForConditionalGeneration"
    quantized = {n: m for n, m in exported.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "model.language_model.layers.1.mlp.up_proj" in quantized
    assert "model.language_model.layers.2.self_attn.k_proj" in quantized
    # The vision tower, the projector and lm_head are written 16-bit, and transformers must keep them so.
    assert not [n for n in quantized if "vision_tower" in n or "multi_modal_projector" in n or n == "lm_head"]
    assert len(quantized) == 4 * 7
    ours, _ = load(str(tmp_path / "q4"), load_in_4bit=True)
    for name, module in quantized.items():
        w = weight(ours, name + ".weight")
        assert isinstance(w, NF4), name
        np.testing.assert_array_equal(np.asarray(dense_weight(w, np.float32)), bnb_dequantized(module.weight).numpy())
    # The 16-bit modules come back as they were.
    key = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    np.testing.assert_array_equal(np.asarray(weight(ours, key)), exported.get_parameter(key).detach().numpy())


def test_train_export_and_generate_clis(tiny, tmp_path, capsys):
    from tests.test_cli import check_train_generate_export
    check_train_generate_export(tiny[0], FAMILY, tmp_path, capsys)


def test_engine_gives_each_request_the_tokens_of_generate(loaded):
    """The slot cache's per-row slots reach the sliding layers' rings too (jaxvlm.engine)."""
    from tests.test_engine import check_decode_writes_the_cache_in_place, check_engine_matches_generate
    model, processor, _ = loaded
    check_engine_matches_generate(model, processor, pad=PAD)
    check_decode_writes_the_cache_in_place(model)


def test_engine_through_the_decode_attention_kernel_gives_the_tokens_of_generate(kernel_sized, decode_kernel_calls):
    """The engine's per-row slots through the kernel: each row's ring slot modulo the ring, each row's window."""
    from tests.test_engine import check_engine_matches_generate
    model, processor, _ = kernel_sized
    check_engine_matches_generate(model, processor, pad=PAD)
    assert set(decode_kernel_calls.slots) >= {16}
