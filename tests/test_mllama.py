"""Llama 3.2 Vision (mllama) through the family seam, so far: transformers' fp32 logits (text only, images of
different tile counts, a batch mixing a sample with images and one without, left padding), its two language-model
stacks numbered within `model.language_model.layers` on import, LoRA targets, PEFT adapters both ways and the
merged export (which must put every layer back under its own number), greedy generation with the cached image keys
and values."""
import copy
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxvlm import FastVisionModel
from jaxvlm.lora import linear_modules
from jaxvlm.models.mllama_text import CROSS_SLOTS
from jaxvlm.targets import get_peft_regex, select_modules
from tests.conftest import chat, random_image
from tests.test_lora import _is_adapted, peft_adapted, with_random_b
from tests.test_qwen2_vl_parity import assert_logits_match, encode, hf_logits, load
from tests.tiny import build_hf_model, save_tiny_processor

FAMILY = "mllama"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, transformers model): the gates (zero in transformers' init) set, so that cross-attention shows."""
    path = tmp_path_factory.mktemp(FAMILY)
    hf = build_hf_model(FAMILY)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "cross_attn" in name and "gate" in name:
                p.copy_(torch.tensor([0.6]))
            elif name.endswith((".gate", "gate_attn", "gate_ffn")):
                p.add_(0.5)
    hf.save_pretrained(path)
    save_tiny_processor(path, FAMILY)
    return str(path), hf


@pytest.fixture(scope="module")
def loaded(tiny):
    path, hf = tiny
    model, processor = load(path)
    return model, processor, hf


def _batch(processor, side="right"):
    old = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = side
    try:
        return encode(processor, [chat("what is this digit", 2), chat("describe the picture " * 3), chat("and this", 1)],
                      [[random_image(56, 84), random_image(30, 90, 2)], [], [random_image(40, 40, 3)]])
    finally:
        processor.tokenizer.padding_side = old


def test_tiny_config_uses_the_switches_of_the_real_checkpoints(tiny):
    path, hf = tiny
    text, vision = hf.config.text_config, hf.config.vision_config
    assert len(text.cross_attention_layers) >= 2 and text.num_hidden_layers > len(text.cross_attention_layers)
    assert text.rope_parameters["rope_type"] == "llama3" and vision.max_num_tiles == 4
    assert vision.num_global_layers >= 2 and len(vision.intermediate_layers_indices) == 2
    assert hf.config.image_token_index == text.vocab_size  # outside the vocabulary, as in the checkpoints


def test_text_only(loaded):
    model, processor, hf = loaded
    batch = encode(processor, [chat("what is this digit")])
    assert_logits_match(model(**batch), hf_logits(hf, batch), batch["attention_mask"])


def test_one_image(loaded):
    model, processor, hf = loaded
    batch = encode(processor, [chat("describe the image in many words", 1)], [[random_image(56, 84)]])
    assert batch["aspect_ratio_mask"].sum() > 1, "the image should take several tiles"
    ref = hf_logits(hf, batch)
    assert_logits_match(model(**batch), ref, batch["attention_mask"])
    text = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    assert np.abs(hf_logits(hf, text) - ref).max() > 1e-2, "the cross-attention layers should weigh in"


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_mixing_images_and_a_text_only_sample_with_padding(loaded, side):
    model, processor, hf = loaded
    batch = _batch(processor, side)
    mask = batch["attention_mask"]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # as transformers' generate sets them
    assert_logits_match(model(**batch), hf_logits(hf, {**batch, "position_ids": positions}), mask)


def test_the_two_language_stacks_hold_their_own_layers(loaded):
    """Layer N of transformers' ModuleList is a row of the self- or the cross-attention stack, by kind."""
    model, processor, hf = loaded
    t = hf.config.text_config
    cross = model.model.language_model.cross_attention_layers.cross_attn.q_proj.weight.get_value()
    selfs = model.model.language_model.layers.self_attn.q_proj.weight.get_value()
    for row, layer in enumerate(t.cross_attention_layers):
        ref = hf.model.language_model.layers[layer].cross_attn.q_proj.weight.detach().numpy()
        np.testing.assert_array_equal(np.asarray(cross[row]), ref)
    own = [i for i in range(t.num_hidden_layers) if i not in t.cross_attention_layers]
    for row, layer in enumerate(own):
        ref = hf.model.language_model.layers[layer].self_attn.q_proj.weight.detach().numpy()
        np.testing.assert_array_equal(np.asarray(selfs[row]), ref)


@pytest.mark.parametrize("vision,language,attention,mlp", [
    (True, True, True, True), (False, True, True, True), (True, False, True, True), (True, True, False, True)])
def test_adapted_modules_equal_peft_with_unsloths_regex(loaded, vision, language, attention, mlp):
    model, processor, hf = loaded
    names = list(linear_modules(model))
    assert "model.language_model.layers.1.cross_attn.q_proj" in names  # layer 1 is a cross-attention layer
    assert "model.language_model.layers.1.self_attn.q_proj" not in names
    regex = get_peft_regex(names, vision, language, attention, mlp)
    adapted = FastVisionModel.get_peft_model(model, r=4, finetune_vision_layers=vision,
                                             finetune_language_layers=language, finetune_attention_modules=attention,
                                             finetune_mlp_modules=mlp)
    ours = {name for name, (param, layer) in linear_modules(adapted).items() if _is_adapted(adapted, param, layer)}
    assert ours == set(select_modules(names, regex)) == peft_adapted(copy.deepcopy(hf), regex)


def test_our_adapter_loads_in_peft_and_back_with_equal_logits(loaded, tmp_path):
    from peft import PeftModel
    model, processor, hf = loaded
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4, lora_alpha=8))
    batch = _batch(processor)
    logits = np.asarray(adapted(**batch))
    assert np.abs(logits - hf_logits(hf, batch)).max() > 1e-2, "the adapter should change the logits"
    adapted.save_pretrained(str(tmp_path / "adapter"), processor)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "adapter")).eval()
    assert_logits_match(logits, hf_logits(peft_model, batch), batch["attention_mask"])
    assert_logits_match(model.load_adapter(str(tmp_path / "adapter"))(**batch), logits, batch["attention_mask"])


def test_merged_16bit_export_loads_in_transformers_with_our_logits(loaded, tmp_path):
    import transformers
    model, processor, hf = loaded
    adapted = with_random_b(FastVisionModel.get_peft_model(model, r=4))
    batch = _batch(processor)
    logits = np.asarray(adapted(**batch))
    adapted.save_pretrained_merged(str(tmp_path / "out"), processor, save_method="merged_16bit")
    merged = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert_logits_match(logits, hf_logits(merged.eval(), batch), batch["attention_mask"])


def test_greedy_equals_transformers_for_a_left_padded_batch_mixing_images_and_text(loaded):
    from tests.test_qwen2_vl_parity import assert_greedy_matches
    model, processor, hf = loaded
    batch = _batch(processor, "left")
    eos = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert_greedy_matches(model, hf, batch, new_tokens=16, eos=eos, pad=processor.tokenizer.pad_token_id)


@pytest.mark.parametrize("kernel", [False, True], ids=["xla", "kernel"])
def test_a_decode_step_gives_the_logits_of_transformers_for_a_batch_mixing_images_and_text(loaded, request, kernel):
    """After a left-padded prompt batch (two images, none, one), a decode step's logits are transformers' for the
    prompt plus that token, on every row: the text row attends to all of its padding image's tokens and to none of
    the cache's padding slots (its image keys are held in multiples of CROSS_SLOTS), the one-image row to its image
    only. Through XLA's attention over the cache entry and through the decode kernel's read-only form."""
    from jaxvlm.generate import _decode_step, _prefill
    calls = request.getfixturevalue("decode_kernel_calls") if kernel else None
    model, processor, hf = loaded
    batch = _batch(processor, "left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    (b, n), length = ids.shape, 64 * -(-(ids.shape[1] + 1) // 64)
    inputs = model.prepare_inputs(**batch)
    key_mask = jnp.asarray(np.concatenate([mask, np.ones((b, length - n), mask.dtype)], axis=1))
    first, cache = _prefill(model, jax.tree.map(jnp.asarray, inputs), model.init_cache(b, length), key_mask, mesh=None)
    assert cache.k_cross.shape[2] % CROSS_SLOTS == 0 and (np.asarray(cache.last_cross) == 0).any()
    token = jnp.argmax(first, axis=-1).astype(jnp.int32)
    logits, _ = _decode_step(model, cache, token, 0, key_mask, jnp.asarray(model.next_positions(inputs)),
                             prompt_len=n, mesh=None)
    cross = batch["cross_attention_mask"]  # the new token sees what the prompt's last token saw (transformers)
    longer = {**batch, "input_ids": np.concatenate([ids, np.asarray(token)[:, None]], axis=1),
              "attention_mask": np.concatenate([mask, np.ones((b, 1), mask.dtype)], axis=1),
              "cross_attention_mask": np.concatenate([cross, cross[:, -1:]], axis=1)}
    positions = np.maximum(np.cumsum(longer["attention_mask"], axis=1) - 1, 0)
    ref = hf_logits(hf, {**longer, "position_ids": positions})[:, -1]
    assert_logits_match(logits, ref, np.ones(b, bool))
    if kernel:
        assert sorted(set(calls.read)) == list(range(len(model.config.text.cross_attention_layers)))


def test_greedy_text_only_prompt(loaded):
    from tests.test_qwen2_vl_parity import assert_greedy_matches
    model, processor, hf = loaded
    batch = encode(processor, [chat("what is this digit")])
    eos = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert_greedy_matches(model, hf, batch, new_tokens=16, eos=eos, pad=processor.tokenizer.pad_token_id)


def test_sampling_with_top_k_1_is_greedy_and_seeds_reproduce(loaded):
    model, processor, hf = loaded
    batch = _batch(processor, "left")
    kw = dict(max_new_tokens=16, eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|eot_id|>"),
              pad_token_id=processor.tokenizer.pad_token_id)
    greedy = model.generate(**batch, **kw)
    np.testing.assert_array_equal(model.generate(**batch, **kw, do_sample=True, top_k=1), greedy)
    a, b, c = (model.generate(**batch, **kw, do_sample=True, temperature=1.5, top_p=0.95, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_merged_4bit_export_loads_in_transformers_with_bitsandbytes(loaded, tmp_path):
    """The merged 4-bit export: every Linear but the projector and lm_head as bitsandbytes Linear4bit in
    transformers (the cross-attention layers' under their own numbers), with our NF4 bytes back here."""
    import json
    import bitsandbytes as bnb
    import transformers
    from jaxvlm.layers import dense_weight
    from jaxvlm.quant import NF4
    from tests.test_quantized_import import bnb_dequantized, weight
    model, processor, hf = loaded
    model.save_pretrained_merged(str(tmp_path / "q4"), processor, save_method="merged_4bit")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    exported = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "q4", dtype=torch.float32)
    assert type(exported).__name__ == "MllamaForConditionalGeneration"
    quantized = {n: m for n, m in exported.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    linears = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(quantized) == sorted(n for n in linears if n != "lm_head" and "multi_modal_projector" not in n)
    assert "model.language_model.layers.3.cross_attn.q_proj" in quantized
    ours, _ = load(str(tmp_path / "q4"), load_in_4bit=True)
    for name, module in quantized.items():
        w = weight(ours, name + ".weight")
        assert isinstance(w, NF4), name
        np.testing.assert_array_equal(np.asarray(dense_weight(w, np.float32)), bnb_dequantized(module.weight).numpy())
    key = "model.multi_modal_projector.weight"
    np.testing.assert_array_equal(np.asarray(weight(ours, key)), exported.get_parameter(key).detach().numpy())


def test_load_in_4bit_quantizes_linear_weights_as_bitsandbytes_does(tiny):
    """Every Linear but Unsloth's 16-bit modules (the projector, lm_head) in NF4 with bitsandbytes' bytes, the
    cross-attention stack's rows included (each under its own layer number); the logits then equal transformers'
    with bitsandbytes' dequantized weights."""
    import bitsandbytes.functional as F
    from jaxvlm.quant import NF4
    from tests.test_quantized_import import bnb_dequantized, weight
    path, hf = tiny
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
                np.testing.assert_array_equal(np.asarray(ours), module.weight.numpy(), err_msg=name)
                continue
            assert isinstance(ours, NF4), name
            packed, state = F.quantize_4bit(module.weight.data.clone(), quant_type="nf4", compress_statistics=True,
                                            blocksize=64)
            np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().ravel(), err_msg=name)
            module.weight.copy_(bnb_dequantized(type("W", (), {"data": packed, "quant_state": state})))
            quantized.append(name)
    assert "model.language_model.layers.3.cross_attn.k_proj" in quantized
    assert "model.language_model.layers.4.self_attn.v_proj" in quantized
    assert any("vision_model.global_transformer.layers.1" in n for n in quantized)
    batch = encode(processor, [chat("describe the image in many words", 1)], [[random_image(56, 84)]])
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


# -- 4-bit checkpoints --------------------------------------------------------------------------------------------

# Unsloth's "-bnb-4bit" Llama 3.2 Vision checkpoints keep these 16-bit; transformers 5 matches llm_int8_skip_modules
# from the start of a module's name or as its suffix, so the in-memory prefix too.
SKIPPED = ["lm_head", "multi_modal_projector", "model.multi_modal_projector"]


def test_bnb_4bit_checkpoint_imports_as_nf4_with_bitsandbytes_logits(tiny, tmp_path):
    """A checkpoint quantized and saved by transformers + bitsandbytes imports with its NF4 bytes (language stacks,
    the cross-attention rows under their own numbers, the vision encoder) and gives the logits of transformers
    with bitsandbytes' dequantized weights."""
    import bitsandbytes as bnb
    import shutil
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    from jaxvlm.quant import NF4
    from tests.test_quantized_import import PROCESSOR_FILES, bnb_dequantized, weight
    path, hf = tiny
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
    assert n > 0 and "model.language_model.layers.3.cross_attn.q_proj" in modules
    model, processor = load(str(tmp_path), load_in_4bit=True)
    for key in ("model.language_model.layers.3.cross_attn.q_proj.weight",
                "model.language_model.layers.4.mlp.down_proj.weight",
                "model.vision_model.global_transformer.layers.1.self_attn.o_proj.weight"):
        assert isinstance(weight(model, key), NF4), key
        assert isinstance(modules[key.removesuffix(".weight")], bnb.nn.Linear4bit), key
    projector = weight(model, "model.multi_modal_projector.weight")
    assert not isinstance(projector, NF4)
    np.testing.assert_array_equal(np.asarray(projector), reference.get_parameter(
        "model.multi_modal_projector.weight").detach().numpy())
    batch = encode(processor, [chat("describe the image in many words", 1)], [[random_image(56, 84)]])
    assert_logits_match(model(**batch), hf_logits(reference, batch), batch["attention_mask"])


# -- data and training --------------------------------------------------------------------------------------------

USER, ASSISTANT = "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"


def record(n_images, question, answer, seed=0):
    content = [*({"type": "image", "image": random_image(40 + 19 * i, 30 + 25 * i, seed=seed + i)}
                 for i in range(n_images)), {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def bare(messages):
    return [{**m, "content": [{"type": "image"} if c["type"] == "image" else c for c in m["content"]]}
            for m in messages]


# A sample with 2 images of different tile counts, one with none, one with 5.
RECORDS = [record(2, "what are these", "two red digits"), record(0, "say hello", "hello"),
           record(5, "describe the five images", "five blue photos", 10)]


def test_collator_unpadded_batch_equals_the_processor(loaded):
    from jaxvlm.train import VisionDataCollator
    model, processor, hf = loaded
    batch = VisionDataCollator(model, processor, pad_to_bucket=False, resize=None)(RECORDS)
    texts = [processor.apply_chat_template(bare(r["messages"]), tokenize=False) for r in RECORDS]
    images = [[c["image"] for c in r["messages"][0]["content"] if c["type"] == "image"] for r in RECORDS]
    ref = processor(text=texts, images=images, padding=True, return_tensors="np", add_special_tokens=False)
    assert set(batch) == set(ref) | {"labels"}
    for key, value in ref.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)


def test_collator_buckets_images_and_tokens_and_keeps_the_logits(loaded):
    """Bucketed: 64 tokens (the image axis as the processor pads it: transformers lets the text rows that see no
    image attend to all images, padding ones too, so their count is not bucketed), the text-only sample's vision
    arrays the processor's padding, the cross-attention mask's rows after the text repeating its last row; the
    logits equal the unpadded batch's and transformers'; only the answers are trained on (the family's markers by
    default)."""
    from jaxvlm.train import VisionDataCollator
    model, processor, hf = loaded
    batch = VisionDataCollator(model, processor, train_on_responses_only=True)(RECORDS)
    unpadded = VisionDataCollator(model, processor, pad_to_bucket=False)(RECORDS)
    n = unpadded["input_ids"].shape[1]
    assert batch["input_ids"].shape == (3, 64) and batch["pixel_values"].shape == (3, 5, 4, 3, 28, 28)
    assert batch["cross_attention_mask"].shape == (3, 64, 5, 4)
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        np.testing.assert_array_equal(batch[key], unpadded[key], err_msg=key)
    np.testing.assert_array_equal(batch["aspect_ratio_mask"][1], [[1, 0, 0, 0]] * 5)  # the processor's padding
    assert not batch["pixel_values"][1].any() and not batch["cross_attention_mask"][1].any()
    lengths = unpadded["attention_mask"].sum(axis=1)
    for b in (0, 2):
        tail = batch["cross_attention_mask"][b, lengths[b]:]
        assert (tail == batch["cross_attention_mask"][b, lengths[b] - 1]).all()
    marker = processor.tokenizer(ASSISTANT, add_special_tokens=False)["input_ids"]
    for ids, labels, length in zip(batch["input_ids"], batch["labels"], lengths):
        start = next(i + len(marker) for i in range(len(ids)) if list(ids[i:i + len(marker)]) == marker)
        trained = np.zeros(len(ids), bool)
        trained[start:length] = True
        np.testing.assert_array_equal(labels != -100, trained)
    ref = np.asarray(model(**{k: v for k, v in unpadded.items() if k != "labels"}))
    assert_logits_match(np.asarray(model(**{k: v for k, v in batch.items() if k != "labels"}))[:, :n], ref,
                        unpadded["attention_mask"])
    assert_logits_match(ref, hf_logits(hf, {k: v for k, v in unpadded.items() if k != "labels"}),
                        unpadded["attention_mask"])


def test_lora_sft_losses_equal_transformers_and_peft_for_3_steps(tiny, tmp_path):
    """Our collator (the family's markers), SFTTrainer and LoRA on every layer kind, against transformers + PEFT +
    torch AdamW from the same init on the same batches (records with and without images)."""
    from peft import PeftModel
    from jaxvlm.train import VisionDataCollator
    from jaxvlm.train.trainer import SFTConfig, SFTTrainer
    from tests.test_trainer import train_and_compare_with_peft
    path, hf = tiny
    model, processor = load(path)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    model.save_pretrained(str(tmp_path / "init"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "init"), is_trainable=True)
    # One image per record (one compiled step; the collator tests cover several), and one without.
    data = [record(1, "which digit is this", f"the digit is {i}", seed=i) for i in range(6)]
    data[3] = record(0, "say a digit", "three")
    args = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=3, learning_rate=5e-3,
                     warmup_steps=1, weight_decay=0.01, optim="adamw_torch", output_dir=str(tmp_path / "out"), seed=0)
    trainer = SFTTrainer(model, processor, VisionDataCollator(model, processor, train_on_responses_only=True), data,
                         args=args)
    train_and_compare_with_peft(trainer, peft_model, 3)


def test_train_export_and_generate_clis(tiny, tmp_path, capsys):
    from tests.test_cli import check_train_generate_export
    check_train_generate_export(tiny[0], FAMILY, tmp_path, capsys)


def engine_matches_generate_alone(model, processor, images, questions, new, steps):
    """Requests (one per question, with its images; `new` tokens each) through an engine of 2 slots starting without
    image keys and values: each gets the greedy tokens `generate` gives it alone. Returns (engine, the requests'
    processor outputs)."""
    from jaxvlm.engine import Engine
    pad = processor.tokenizer.pad_token_id
    single = [encode(processor, [chat(q, len(i))], [i] if i else None) for q, i in zip(questions, images)]
    want = [list(model.generate(**inputs, max_new_tokens=n, eos_token_id=-1, pad_token_id=pad)[0, -n:])
            for inputs, n in zip(single, new)]
    engine = Engine(model, max_num_seqs=2, max_length=256, eos_token_id=-1, pad_token_id=pad, steps=steps)
    assert engine.cache.k_cross.shape[2] == 0
    requests = [engine.submit(max_new_tokens=n, **inputs) for n, inputs in zip(new, single)]
    engine.run()
    for i, (request, tokens) in enumerate(zip(requests, want)):
        assert request.token_ids == [int(t) for t in tokens], f"request {i} ({len(images[i])} images)"
    return engine, single


def test_engine_gives_image_and_text_requests_the_tokens_generate_gives_each_alone(loaded, monkeypatch):
    """Requests with no image, one and two images through the engine (2 slots, refilled mid-run): each gets the greedy
    tokens `generate` gives it alone. The slot cache starts without image keys and values, grows at the first image
    request and again at the two-image one; a text request's rows there are zeros, which add nothing (generate skips
    the cross-attention layers for it), and a one-image row's second block is masked. Batched generate is no
    reference here: in a batch with images, transformers' text rows attend to a padding image. A family that does not
    set `INFO.prompt_sized_cache` is refused such a prompt, by name."""
    from jaxvlm.engine import Engine
    from tests.test_engine import check_decode_writes_the_cache_in_place, check_engine_matches_generate
    model, processor, _ = loaded
    pad = processor.tokenizer.pad_token_id
    check_engine_matches_generate(model, processor, images_per_request=(None,) * 5, pad=pad)
    check_decode_writes_the_cache_in_place(model)
    images = [[], [random_image(56, 84)], [random_image(30, 90, 2), random_image(40, 40, 3)], [],
              [random_image(40, 40, 4)]]
    questions = ["what is this", "describe the image", "compare the two pictures please", "hi", "count"]
    engine, single = engine_matches_generate_alone(model, processor, images, questions, [6, 9, 5, 8, 7], steps=3)
    one_image = model.prepare_inputs(**single[1])["cross_tiles"].shape[2:]  # (images, tiles) of a one-image prompt
    two_images = 2 * np.prod(one_image) * model.config.vision.num_patches  # the cache's slots: those, padded
    assert engine.cache.k_cross.shape[2] == -(-two_images // CROSS_SLOTS) * CROSS_SLOTS
    monkeypatch.setattr(type(model), "INFO", dataclasses.replace(type(model).INFO, prompt_sized_cache=False))
    engine = Engine(model, max_num_seqs=2, max_length=256, eos_token_id=-1, pad_token_id=pad)
    engine.submit(max_new_tokens=4, **single[1])
    with pytest.raises(NotImplementedError, match=type(model).__name__):
        engine.run()


def test_engine_through_the_decode_kernel_gives_each_request_the_tokens_of_generate(loaded, decode_kernel_calls):
    """The engine's step with its layers through the decode kernel (interpret mode): each row's own slot for the self
    layers, the read-only form over the slot cache's image keys for the cross layers, which grows from none to two
    images' worth, zero-padded rows read as absent. Requests with 0, 2 and 1 images get generate's tokens alone."""
    model, processor, _ = loaded
    images = [[], [random_image(30, 90, 2), random_image(40, 40, 3)], [random_image(56, 84)]]
    engine, _ = engine_matches_generate_alone(model, processor, images, ["hi there", "compare the two pictures",
                                                                         "describe it"], [5, 4, 6], steps=2)
    cross = len(model.config.text.cross_attention_layers)
    assert sorted(set(decode_kernel_calls.read)) == list(range(cross))
    assert engine.cache.k_cross.shape[2] % CROSS_SLOTS == 0


def test_greedy_through_the_decode_attention_kernel_equals_transformers(loaded, decode_kernel_calls):
    """Generation's step runs the layers unrolled in their order (cross and self), each self-attention layer's decode
    through the Pallas decode-attention kernel (interpret mode) and each cross-attention layer's through its
    read-only form over the cached image keys: transformers' tokens, every layer through it."""
    from tests.test_qwen2_vl_parity import assert_greedy_matches
    model, processor, hf = loaded
    batch = _batch(processor, "left")
    eos = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert_greedy_matches(model, hf, batch, new_tokens=16, eos=eos, pad=processor.tokenizer.pad_token_id)
    assert sorted(set(decode_kernel_calls)) == list(range(len(model.config.text.self_attention_layers)))
    assert sorted(set(decode_kernel_calls.read)) == list(range(len(model.config.text.cross_attention_layers)))
