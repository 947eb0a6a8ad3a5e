"""Video through the Qwen families' models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense and MoE): fp32 logits and
greedy tokens equal transformers' for videos of 2-4 frames of different sizes, mixed with images, padded on either side.

The batches are built by hand from the processors' token layout (tests/test_video_processing.py checks the
processors), so these tests pin the model side: the video tokens' M-RoPE positions (frame steps for Qwen2-VL,
tokens_per_second x second_per_grid_ts for Qwen2.5-VL, one grid per frame after its timestamp for Qwen3-VL),
the video patches through the vision tower (with Qwen3-VL's deepstack at video tokens) and generation.
"""
import numpy as np
import pytest
from PIL import Image

from jaxvlm.models.qwen_inputs import rope_index
from jaxvlm.train.collator import VisionDataCollator, bucket_size
from tests.conftest import random_image, save_tiny_model
from tests.test_qwen2_vl_parity import assert_greedy_matches, assert_logits_match, hf_logits, load

EOS, PAD = 287, 285
START, END, IMAGE, VIDEO = 288, 289, 290, 291
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    """(family, our fp32 model, processor, transformers model)."""
    path = tmp_path_factory.mktemp(f"video-{request.param}")
    hf_model = save_tiny_model(path, request.param)
    model, processor = load(str(path))
    return request.param, model, processor, hf_model


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _video_tokens(family, tokenizer, grid, seconds_per_frame):
    """The tokens a processor writes for a video of `grid` (t, h, w) patches: one run of t*h*w/4 video tokens
    (Qwen2-VL, Qwen2.5-VL), or per frame a timestamp then its own run (Qwen3-VL)."""
    t, h, w = grid
    per_frame = h * w // 4
    if not family.startswith("qwen3_vl"):
        return [START] + [VIDEO] * (t * per_frame) + [END]
    out = []
    for frame in range(t):
        out += _ids(tokenizer, f"<{frame * seconds_per_frame:.1f} seconds>") + [START] + [VIDEO] * per_frame + [END]
    return out


def video_batch(family, processor, side, seed=0):
    """A batch of 2: [image (4x6 patches) + video (4 frames, 6x4 patches) + text], [video (2 frames, 4x8 patches)
    + longer text], padded on `side`; with Qwen2.5-VL's second_per_grid_ts."""
    tok = processor.tokenizer
    rng = np.random.default_rng(seed)
    p = PATCH[family]
    dim = 3 * 2 * p * p
    image_grid = np.array([[1, 4, 6]])
    video_grid = np.array([[2, 6, 4], [1, 4, 8]])
    head, tail = _ids(tok, "<|im_start|>user\n"), _ids(tok, "<|im_end|>\n<|im_start|>assistant\n")
    rows = [
        head + [START] + [IMAGE] * 6 + [END] + _video_tokens(family, tok, video_grid[0], 1.0)
        + _ids(tok, "what happens") + tail,
        head + _video_tokens(family, tok, video_grid[1], 0.5) + _ids(tok, "what happens in this clip and why")
        + tail,
    ]
    n = max(map(len, rows))
    ids = np.full((2, n), PAD, np.int64)
    mask = np.zeros((2, n), np.int64)
    for i, row in enumerate(rows):
        at = slice(n - len(row), n) if side == "left" else slice(0, len(row))
        ids[i, at], mask[i, at] = row, 1
    batch = {
        "input_ids": ids, "attention_mask": mask,
        "mm_token_type_ids": np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0)) * mask,
        "pixel_values": rng.standard_normal((int(image_grid.prod(1).sum()), dim)).astype(np.float32),
        "image_grid_thw": image_grid,
        "pixel_values_videos": rng.standard_normal((int(video_grid.prod(1).sum()), dim)).astype(np.float32),
        "video_grid_thw": video_grid,
    }
    if family == "qwen2_5_vl":
        batch["second_per_grid_ts"] = np.array([0.6, 1.0], np.float32)  # 0.6 s x 4 tokens_per_second: 2.4, truncated
    return batch


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_of_videos_with_an_image_equal_transformers(family_model, side):
    family, model, processor, hf_model = family_model
    batch = video_batch(family, processor, side)
    assert (batch["attention_mask"][:, 0 if side == "left" else -1] == 0).any()
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_video_only_sample_equals_transformers(family_model):
    family, model, processor, hf_model = family_model
    batch = video_batch(family, processor, "right", seed=1)
    one = {k: v[1:] for k, v in batch.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    n0 = int(batch["video_grid_thw"][0].prod())
    one.update(pixel_values_videos=batch["pixel_values_videos"][n0:], video_grid_thw=batch["video_grid_thw"][1:])
    if family == "qwen2_5_vl":
        one["second_per_grid_ts"] = batch["second_per_grid_ts"][1:]
    keep = one["attention_mask"][0].astype(bool)
    one = {k: (v[:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v) for k, v in one.items()}
    assert_logits_match(model(**one), hf_logits(hf_model, one), one["attention_mask"])


def test_greedy_generation_with_video_equals_transformers(family_model):
    family, model, processor, hf_model = family_model
    batch = video_batch(family, processor, "left", seed=2)
    assert_greedy_matches(model, hf_model, batch, eos=EOS, pad=PAD)


def test_rope_index_scales_and_truncates_video_time_like_transformers():
    """Qwen2.5-VL: temporal position of grid step k is int(k * tokens_per_second * second_per_grid_ts), then the
    running position advances by max(h, w) / merge only."""
    ids = np.array([[1, VIDEO, VIDEO, VIDEO, 2]])
    pos, delta = rope_index(ids, np.ones_like(ids), None, np.array([[3, 2, 2]]), image_token_id=IMAGE,
                            video_token_id=VIDEO, spatial_merge_size=2, video_time_scale=np.float32([4 * 0.3]))
    np.testing.assert_array_equal(pos[:, 0], [[0, 1, 2, 3, 2], [0, 1, 1, 1, 2], [0, 1, 1, 1, 2]])
    assert delta[0] == 4 - 5


def test_mismatched_video_tokens_name_the_run():
    ids = np.array([[1, VIDEO, VIDEO, 2]])
    with pytest.raises(ValueError, match="video of grid .* needs 3 video tokens, the run at position 1 has 2"):
        rope_index(ids, np.ones_like(ids), None, np.array([[3, 2, 2]]), image_token_id=IMAGE, video_token_id=VIDEO,
                   spatial_merge_size=2)


# -- through the processor and the collator ---------------------------------------------------------------


def frames(n, width, height, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def video_chat(text, n_images=0):
    content = ([{"type": "image"}] * n_images + [{"type": "video"}, {"type": "text", "text": text}])
    return [{"role": "user", "content": content}]


def test_processor_video_batch_equals_transformers(family_model):
    """The torch-free processor's video batch (2 and 4 frames of different sizes, one sample with an image too,
    padded) gives transformers' logits: processor and model agree on the token layout."""
    family, model, processor, hf_model = family_model
    prompts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
               for c in (video_chat("what happens here", 1), video_chat("and in this clip"))]
    batch = dict(processor(text=prompts, images=[random_image(56, 56, seed=5)],
                           videos=[frames(4, 56, 84, 1), frames(2, 84, 56, 2)], padding=True, return_tensors="np"))
    assert len(batch["video_grid_thw"]) == 2 and (batch["mm_token_type_ids"] == 2).any()
    assert_logits_match(model(**batch), hf_logits(hf_model, batch), batch["attention_mask"])


def test_collator_video_records_train_and_match_the_unpadded_forward(family_model):
    """Video records through the collator (frames inline, and a 'videos' column): video tokens never targets,
    bucket padding shared by image and video patches, and the padded batch's logits equal the processor's."""
    family, model, processor, hf_model = family_model
    records = [
        {"messages": [{"role": "user", "content": [{"type": "video", "video": frames(4, 56, 84, 3)},
                                                    {"type": "text", "text": "what moves"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                                    {"type": "text", "text": "compare"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "the same"}]}],
         "images": [random_image(56, 56, seed=6)], "videos": [frames(2, 84, 56, 4)]},
    ]
    collator = VisionDataCollator(model, processor, train_on_responses_only=True)
    batch = collator(records)
    assert batch["pixel_values_videos"].shape[0] == int(np.prod(batch["video_grid_thw"], axis=1).sum())
    n = len(batch["pixel_values"]) - batch["n_pad_patches"] + len(batch["pixel_values_videos"])
    assert len(batch["pixel_values"]) + len(batch["pixel_values_videos"]) == bucket_size(n)
    video_at = batch["input_ids"] == VIDEO
    assert video_at.any() and (batch["labels"][video_at] == -100).all()
    assert (batch["labels"] != -100).any()
    ours = np.asarray(model(**{k: v for k, v in batch.items() if k != "labels"}))
    for row, record in enumerate(records):  # each row against the processor's own unpadded encoding of it
        one = collator.processor
        turns = [{"role": t["role"], "content": [{"type": c["type"], **({"text": c["text"]} if "text" in c else {})}
                                                  for c in t["content"]]} for t in record["messages"]]
        text = one.apply_chat_template(turns, tokenize=False)
        videos = record.get("videos") or [record["messages"][0]["content"][0]["video"]]
        ref = dict(one(text=[text], images=record.get("images"), videos=videos, return_tensors="np"))
        n_tokens = ref["input_ids"].shape[1]
        np.testing.assert_array_equal(batch["input_ids"][row, :n_tokens], ref["input_ids"][0])
        assert_logits_match(ours[row:row + 1, :n_tokens], hf_logits(hf_model, ref), ref["attention_mask"])
