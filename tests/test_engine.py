"""The batched engine (jaxvlm.engine, `fast_inference`): each request gets the tokens `generate` gives it, with fewer
slots than requests (slots refilled mid-run), prompts of different lengths with and without images, EOS mid-way,
decode calls that end mid-request; streams, adapters swapped between calls, bad input.

`check_engine_matches_generate` and `check_decode_writes_the_cache_in_place` are run by the family modules too
(tests/test_gemma3.py, test_llava.py, ...)."""
import numpy as np
import pytest

from jaxvlm.engine import Engine
from tests.conftest import chat, random_image
from tests.test_qwen2_vl_parity import encode, load

PAD = 285

QUESTIONS = ["describe the image", "what is this digit in the image then tell me why, in a few words please", "hi",
             "what is the difference between the two images", "count"]


def requests_of(processor, images_per_request=((56, 56), (84, 56), None, (56, 84), None)):
    """One processor output per request (a prompt each, some with an image) and the same prompts as one batch."""
    texts, images, single = [], [], []
    for question, size in zip(QUESTIONS, images_per_request):
        text = chat(question, 0 if size is None else 1)
        image = None if size is None else [random_image(*size, seed=len(texts))]
        single.append(encode(processor, [text], image))
        texts.append(text)
        images.append(image or [])
    return single, texts, images


def check_engine_matches_generate(model, processor, images_per_request=((56, 56), (84, 56), None, (56, 84), None),
                                  pad=PAD, slots=2, steps=3):
    """Greedy: each request's tokens are its row of one left-padded batched `generate` (which tests/test_generate.py
    and the family modules hold to transformers' tokens), cut at its own max_new_tokens and at the EOS. The EOS is a
    token that one request makes mid-way, so that request stops early and its slot takes the next request."""
    single, texts, images = requests_of(processor, images_per_request)
    old = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        batch = encode(processor, texts, images if any(images) else None)
    finally:
        processor.tokenizer.padding_side = old
    new = [9, 5, 12, 7, 10]
    prompt_len = batch["input_ids"].shape[1]
    free = model.generate(**batch, max_new_tokens=max(new), eos_token_id=-1, pad_token_id=pad)[:, prompt_len:]
    eos = int(free[0, 3])
    ref = model.generate(**batch, max_new_tokens=max(new), eos_token_id=eos, pad_token_id=pad)[:, prompt_len:]

    engine = Engine(model, max_num_seqs=slots, max_length=256, eos_token_id=eos, pad_token_id=pad, steps=steps)
    requests = [engine.submit(max_new_tokens=n, **inputs) for n, inputs in zip(new, single)]
    engine.run()
    stopped = 0
    for i, (request, n) in enumerate(zip(requests, new)):
        want = list(ref[i, :n])
        if eos in want:
            want = want[:want.index(eos) + 1]
            stopped += 1
        assert request.token_ids == [int(t) for t in want], f"request {i}"
        assert request.finish_reason == ("stop" if want[-1] == eos else "length")
    assert stopped >= 1
    return engine, requests


def check_decode_writes_the_cache_in_place(model, length=2048):
    """A decode step (a slot for every row, the engine's; one slot for all, generate's) writes its token into the
    donated cache in place: its working memory stays under the cache's size. (The layers' updated slices stacked into
    a new cache took a whole cache more: that copy was most of the engine's decode step at 64 slots.)"""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    cache = model.init_cache(2, length)
    cache_bytes = sum(a.nbytes for a in jax.tree.leaves(cache))
    graphdef, state = nnx.split(model)

    def step(state, cache, tokens, positions, key_mask, index):
        return nnx.merge(graphdef, state).decode(tokens, positions, cache, key_mask, index)

    zeros = jnp.zeros((2,), jnp.int32)
    for index in (jnp.array([3, 5], jnp.int32), jnp.int32(3)):
        compiled = jax.jit(step, donate_argnums=1).lower(state, cache, zeros, zeros, jnp.ones((2, length), bool),
                                                         index).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < 0.75 * cache_bytes, f"decode step's temp {temp} bytes for a cache of {cache_bytes}"


@pytest.fixture(scope="module")
def loaded(tiny):
    family, path, hf_model = tiny
    model, processor = load(path)
    return model, processor


def test_engine_gives_each_request_the_tokens_of_generate(loaded):
    check_engine_matches_generate(*loaded)
    check_decode_writes_the_cache_in_place(loaded[0])


def test_a_request_streams_its_tokens_while_the_others_run(loaded):
    model, processor = loaded
    single, _, _ = requests_of(processor)
    engine = Engine(model, max_num_seqs=2, max_length=256, eos_token_id=-1, pad_token_id=PAD, steps=4)
    others = [engine.submit(max_new_tokens=6, **inputs) for inputs in single[:2]]
    mine = engine.submit(max_new_tokens=9, **single[2])
    streamed = list(mine)
    assert streamed == mine.token_ids and len(streamed) == 9 and mine.finish_reason == "length"
    assert all(r.finished and len(r.token_ids) == 6 for r in others)  # they ran (and ended) first
    alone = Engine(model, max_num_seqs=1, max_length=256, eos_token_id=-1, pad_token_id=PAD, steps=2)
    assert alone.generate([single[2]], max_new_tokens=9)[0].token_ids == streamed


def test_set_model_swaps_the_adapter_between_calls(loaded):
    import jax
    from flax import nnx

    from jaxvlm import FastVisionModel
    model, processor = loaded
    single, _, _ = requests_of(processor)
    peft = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1)
    # B is zero at init: make the adapter change the output
    state = nnx.state(peft)
    state = jax.tree.map_with_path(lambda p, a: a + 0.5 if "lora_B" in jax.tree_util.keystr(p) else a, state)
    nnx.update(peft, state)
    kw = dict(max_new_tokens=8, eos_token_id=-1, pad_token_id=PAD)
    want_base = model.generate(**single[0], **kw)[0, single[0]["input_ids"].shape[1]:].tolist()
    want_peft = peft.generate(**single[0], **kw)[0, single[0]["input_ids"].shape[1]:].tolist()
    assert want_base != want_peft
    engine = Engine(model, max_num_seqs=2, max_length=256, eos_token_id=-1, pad_token_id=PAD)
    assert engine.generate([single[0]], max_new_tokens=8)[0].token_ids == want_base
    with pytest.raises(ValueError, match="not laid out"):
        engine.set_model(peft)  # a LoRA model has more leaves: another engine
    engine = Engine(peft, max_num_seqs=2, max_length=256, eos_token_id=-1, pad_token_id=PAD)
    assert engine.generate([single[0]], max_new_tokens=8)[0].token_ids == want_peft
    other = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1)  # B = 0: the base's tokens
    engine.set_model(other)
    assert engine.generate([single[0]], max_new_tokens=8)[0].token_ids == want_base


def test_bad_requests_are_refused_with_the_field_named(loaded):
    model, processor = loaded
    single, _, _ = requests_of(processor)
    engine = Engine(model, max_num_seqs=1, max_length=64, eos_token_id=-1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_length=64"):
        engine.submit(max_new_tokens=8, **single[1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(max_new_tokens=0, **single[2])
    with pytest.raises(ValueError, match="input_ids"):
        engine.submit(max_new_tokens=4, input_ids=np.zeros((2, 3), np.int32))
    assert not engine.waiting


def test_fast_generate_takes_vllms_prompts_sampling_params_and_lora_request(loaded, tmp_path):
    """Unsloth's `model.fast_generate` (vLLM's call): a chat string with multi_modal_data, a plain string and processor
    outputs; greedy at temperature 0 gives generate's tokens and the decoded text; seeds reproduce draws; a saved
    adapter directory as lora_request gives the adapter's tokens."""
    import jax
    from flax import nnx

    from jaxvlm import FastVisionModel
    from jaxvlm.engine import SamplingParams
    model, processor = loaded
    image = random_image(56, 56, seed=0)
    text = processor.apply_chat_template(chat(QUESTIONS[0], 1), tokenize=False, add_generation_prompt=True)
    plain = processor.apply_chat_template(chat(QUESTIONS[2]), tokenize=False, add_generation_prompt=True)
    single, _, _ = requests_of(processor)
    prompts = [{"prompt": text, "multi_modal_data": {"image": image}}, plain, single[1]]
    eos = processor.tokenizer.eos_token_id
    want = []
    for inputs in (single[0], single[2], single[1]):
        out = model.generate(**inputs, max_new_tokens=7, eos_token_id=eos, pad_token_id=PAD)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        want.append(new[:new.index(eos) + 1] if eos in new else new)
    got = model.fast_generate(prompts, SamplingParams(temperature=0, max_tokens=7), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert got[0].prompt == text and got[2].prompt is None
    assert got[0].outputs[0].text == processor.tokenizer.decode(want[0], skip_special_tokens=True)

    draws = [model.fast_generate(prompts[:2], SamplingParams(temperature=1.5, top_p=0.9, max_tokens=7, seed=s),
                                 use_tqdm=False) for s in (1, 1, 2)]
    tokens = [[o.outputs[0].token_ids for o in d] for d in draws]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]

    peft = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1)
    state = jax.tree.map_with_path(lambda p, a: a + 0.5 if "lora_B" in jax.tree_util.keystr(p) else a,
                                   nnx.state(peft))
    nnx.update(peft, state)
    peft.save_pretrained(str(tmp_path / "adapter"))
    out = peft.generate(**single[0], max_new_tokens=7, eos_token_id=eos, pad_token_id=PAD)
    new = out[0, single[0]["input_ids"].shape[1]:].tolist()
    got = model.fast_generate(prompts[:1], SamplingParams(temperature=0, max_tokens=7),
                              lora_request=str(tmp_path / "adapter"), use_tqdm=False)
    assert got[0].outputs[0].token_ids == (new[:new.index(eos) + 1] if eos in new else new) != want[0]
    with pytest.raises(ValueError, match="multi_modal_data keys"):
        model.fast_generate([{"prompt": text, "multi_modal_data": {"video": [image]}}], use_tqdm=False)


def test_engine_with_the_decode_attention_kernel(loaded, decode_kernel_calls):
    """The engine's steps (a slot per row) through the decode-attention kernel (interpret mode) give generate's tokens
    (generate's own steps through the kernel too), and write the cache in place."""
    check_engine_matches_generate(*loaded)
    check_decode_writes_the_cache_in_place(loaded[0])
    assert sorted(set(decode_kernel_calls)) == list(range(loaded[0].config.text.num_layers))
