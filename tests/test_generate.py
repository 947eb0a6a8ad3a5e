"""Generation with the KV cache gives transformers' greedy tokens; EOS, padding, streaming, sampling."""
import numpy as np
import pytest
import torch

from tests.conftest import chat, random_image
from tests.test_qwen2_vl_parity import encode, load

EOS, PAD = 287, 285


@pytest.fixture(scope="module")
def setup(tiny):
    family, path, hf_model = tiny
    model, processor = load(path)
    processor.tokenizer.padding_side = "left"
    texts = [chat("describe the image", 1), chat("what is this digit in the image then tell me why", 1)]
    batch = encode(processor, texts, [random_image(56, 56, seed=3), random_image(84, 56, seed=4)])
    return model, processor, hf_model, batch


def hf_generate(hf_model, batch, **kw):
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        return hf_model.generate(**tensors, do_sample=False, pad_token_id=PAD, **kw).numpy()


def test_greedy_equals_transformers_for_a_left_padded_batch_with_images(setup):
    model, processor, hf_model, batch = setup
    assert (batch["attention_mask"][:, 0] == 0).any(), "one prompt should be left-padded"
    ours = model.generate(**batch, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
    np.testing.assert_array_equal(ours, hf_generate(hf_model, batch, max_new_tokens=12, eos_token_id=EOS))


def test_each_sequence_stops_at_its_eos(setup):
    model, processor, hf_model, batch = setup
    free = model.generate(**batch, max_new_tokens=12, eos_token_id=-1, pad_token_id=PAD)
    prompt_len = batch["input_ids"].shape[1]
    eos = int(free[0, prompt_len + 3])  # a token row 0 produces mid-way: both rows stop at it, or run out
    ours = model.generate(**batch, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    ref = hf_generate(hf_model, batch, max_new_tokens=12, eos_token_id=eos)
    np.testing.assert_array_equal(ours, ref)
    first_eos = np.flatnonzero(ours[0, prompt_len:] == eos)[0]
    assert first_eos <= 3 and (ours[0, prompt_len + first_eos + 1:] == PAD).all()


def test_right_padded_prompts_give_the_same_tokens(setup):
    model, processor, hf_model, batch = setup
    processor.tokenizer.padding_side = "right"
    try:
        texts = [chat("describe the image", 1), chat("what is this digit in the image then tell me why", 1)]
        right = encode(processor, texts, [random_image(56, 56, seed=3), random_image(84, 56, seed=4)])
    finally:
        processor.tokenizer.padding_side = "left"
    left_out = model.generate(**batch, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    right_out = model.generate(**right, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    prompt_len = batch["input_ids"].shape[1]
    np.testing.assert_array_equal(left_out[:, prompt_len:], right_out[:, prompt_len:])


class Collect:
    def __init__(self):
        self.puts = []
        self.ended = False

    def put(self, value):
        self.puts.append(np.asarray(value))

    def end(self):
        self.ended = True


def test_streaming_yields_the_same_tokens_step_by_step(setup):
    model, processor, hf_model, batch = setup
    streamer = Collect()
    streamed = model.generate(**batch, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, streamer=streamer)
    looped = model.generate(**batch, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    np.testing.assert_array_equal(streamed, looped)
    assert streamer.ended and np.array_equal(streamer.puts[0], batch["input_ids"])
    np.testing.assert_array_equal(np.stack(streamer.puts[1:], axis=1), looped[:, batch["input_ids"].shape[1]:])


def test_transformers_text_streamer_prints_the_answer(setup, capsys):
    from transformers import TextStreamer
    model, processor, hf_model, batch = setup
    one = {k: v[1:] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    one.update(pixel_values=batch["pixel_values"][-(batch["image_grid_thw"][1].prod()):],
               image_grid_thw=batch["image_grid_thw"][1:])
    out = model.generate(**one, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD,
                         streamer=TextStreamer(processor.tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out.strip()
    assert printed == processor.tokenizer.decode(out[0, one["input_ids"].shape[1]:]).strip()


def test_sampling_with_top_k_1_is_greedy_and_seeds_reproduce(setup):
    model, processor, hf_model, batch = setup
    greedy = model.generate(**batch, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    top1 = model.generate(**batch, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, do_sample=True, top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    a, b, c = (model.generate(**batch, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, do_sample=True,
                              temperature=1.5, top_p=0.95, min_p=0.01, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_max_new_tokens_beyond_max_seq_length_is_clamped_with_a_warning(setup):
    model, processor, hf_model, batch = setup
    prompt_len = batch["input_ids"].shape[1]
    with pytest.warns(UserWarning, match="exceeds max_seq_length"):
        out = model.generate(**batch, max_new_tokens=50, eos_token_id=-1, pad_token_id=PAD,
                             max_seq_length=prompt_len + 4)
    assert out.shape[1] == prompt_len + 4
    with pytest.raises(ValueError, match="already fills max_seq_length"):
        model.generate(**batch, max_new_tokens=5, max_seq_length=prompt_len)


def test_batch_one_decoding_by_sums_gives_transformers_tokens(setup, monkeypatch):
    """The GPU's batch-1 decode (each Linear a float32 multiply + sum, forced here on the CPU; the layers unrolled
    as generation always does) gives transformers' greedy tokens."""
    from jaxvlm import layers
    model, processor, hf_model, batch = setup
    monkeypatch.setattr(layers, "rows_product", "on")
    one = {k: v[1:] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    patches = int(np.prod(batch["image_grid_thw"][0]))
    one.update(pixel_values=batch["pixel_values"][patches:], image_grid_thw=batch["image_grid_thw"][1:])
    ours = model.generate(**one, max_new_tokens=16, eos_token_id=-1, pad_token_id=PAD)
    np.testing.assert_array_equal(ours, hf_generate(hf_model, one, max_new_tokens=16, min_new_tokens=16))


def test_decode_attention_kernel_gives_transformers_tokens(setup, decode_kernel_calls):
    """Generation whose decode steps write the cache and attend by the Pallas kernel (every layer, in interpret mode)
    gives transformers' greedy tokens for the left-padded batch with images."""
    model, processor, hf_model, batch = setup
    calls = decode_kernel_calls
    ours = model.generate(**batch, max_new_tokens=12, eos_token_id=-1, pad_token_id=PAD)
    assert sorted(set(calls)) == list(range(model.config.text.num_layers))
    np.testing.assert_array_equal(ours, hf_generate(hf_model, batch, max_new_tokens=12, min_new_tokens=12))
