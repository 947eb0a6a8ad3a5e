"""The vision data collator: chat records -> the processor's arrays, masked labels, bucketed static shapes."""
import inspect
import json
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from jaxvlm import FastVisionModel
from jaxvlm.models import qwen2_vl
from jaxvlm.processing import load_processor
from jaxvlm.tiny import save_random_model
from jaxvlm.train import DataError, VisionDataCollator, bucket_size, bucket_sizes, load_jsonl, load_records
from tests.conftest import random_image
from tests.tiny import IMAGE_TOKEN_ID, VISION_END_ID, VISION_START_ID

VISION_IDS = [VISION_START_ID, IMAGE_TOKEN_ID, VISION_END_ID]
QWEN_PARTS = dict(instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n")
MAX_SEQ = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2_vl"))
    save_random_model(path, "qwen2_vl")
    return path


@pytest.fixture(scope="module")
def processor(model_dir):
    return load_processor(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    model, _ = FastVisionModel.from_pretrained(model_dir, max_seq_length=MAX_SEQ, load_in_4bit=False,
                                               dtype="float32")
    return model


def record(images, question="what is this?", answer="a red digit"):
    """A one-turn chat record whose user turn shows `images` (PIL images, paths or bytes)."""
    content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def bare(messages):
    """The messages with each image item reduced to {"type": "image"}."""
    return [{**m, "content": [{"type": "image"} if c["type"] == "image" else c for c in m["content"]]}
            for m in messages]


def templated(processor, rec):
    """The record's chat text as a user would build it for the processor."""
    return processor.apply_chat_template(bare(rec["messages"]), tokenize=False)


IMAGES = [random_image(56, 84), random_image(112, 56, seed=1), random_image(112, 112, seed=2)]
RECORDS = [record(IMAGES[:1]), record(IMAGES[1:], question="describe the two images", answer="two blue photos")]


def test_unpadded_batch_equals_the_processor(model, processor):
    batch = VisionDataCollator(model, processor, pad_to_bucket=False)(RECORDS)
    ref = processor(text=[templated(processor, r) for r in RECORDS], images=[IMAGES[:1], IMAGES[1:]],
                    padding=True, return_tensors="np")
    assert set(batch) == set(ref) | {"labels"}
    for key, value in ref.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)


def test_labels_are_input_ids_except_at_padding_and_vision_tokens(model, processor):
    batch = VisionDataCollator(model, processor, pad_to_bucket=False)(RECORDS)
    ids, labels = batch["input_ids"], batch["labels"]
    masked = (batch["attention_mask"] == 0) | np.isin(ids, VISION_IDS)
    assert (batch["attention_mask"] == 0).any() and labels.dtype == np.int32
    np.testing.assert_array_equal(labels == -100, masked)
    np.testing.assert_array_equal(labels[~masked], ids[~masked])


def response_starts(ids, marker):
    """Positions just after each occurrence of the token sequence `marker` in `ids`."""
    return [i + len(marker) for i in range(len(ids) - len(marker) + 1) if list(ids[i:i + len(marker)]) == marker]


def test_train_on_responses_only_masks_everything_through_the_response_marker(model, processor):
    collator = VisionDataCollator(model, processor, train_on_responses_only=True, pad_to_bucket=False, **QWEN_PARTS)
    batch = collator(RECORDS)
    marker = processor.tokenizer(QWEN_PARTS["response_part"], add_special_tokens=False)["input_ids"]
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        [start] = response_starts(ids, marker)
        assert (labels[:start] == -100).all()
        response = slice(start, mask.sum())
        np.testing.assert_array_equal(labels[response], ids[response])
        assert processor.tokenizer.convert_ids_to_tokens(labels[response][-2:].tolist()) == ["<|im_end|>", "\n"]


def test_train_on_responses_only_masks_later_user_turns(model, processor):
    turns = [record([IMAGES[0]])["messages"], record([], question="and this?", answer="a blue one")["messages"]]
    rec = {"messages": turns[0] + turns[1]}
    marker = processor.tokenizer(QWEN_PARTS["response_part"], add_special_tokens=False)["input_ids"]
    user = processor.tokenizer(QWEN_PARTS["instruction_part"], add_special_tokens=False)["input_ids"]
    for last_only in (False, True):
        collator = VisionDataCollator(model, processor, train_on_responses_only=True, last_response_only=last_only,
                                      pad_to_bucket=False, **QWEN_PARTS)
        batch = collator([rec])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        first, second = response_starts(ids, marker)
        second_user = response_starts(ids, user)[1] - len(user)
        trained = np.zeros(len(ids), bool)
        trained[second:] = True
        if not last_only:
            trained[first:second_user] = True
        np.testing.assert_array_equal(labels != -100, trained)


def test_prompt_completion_records_take_no_loss_on_the_prompt(model, processor):
    messages = RECORDS[0]["messages"]
    pc = {"prompt": messages[:1], "completion": messages[1:]}
    batch = VisionDataCollator(model, processor, pad_to_bucket=False)([pc])
    plain = VisionDataCollator(model, processor, pad_to_bucket=False)(RECORDS[:1])
    np.testing.assert_array_equal(batch["input_ids"], plain["input_ids"])
    np.testing.assert_array_equal(batch["pixel_values"], plain["pixel_values"])
    prompt = processor.apply_chat_template(bare(messages[:1]), tokenize=False, add_generation_prompt=True)
    n_prompt = len(processor(text=[prompt], images=IMAGES[:1], return_tensors="np")["input_ids"][0])
    labels = batch["labels"][0]
    assert (labels[:n_prompt] == -100).all()
    np.testing.assert_array_equal(labels[n_prompt:], batch["input_ids"][0][n_prompt:])


def test_bucket_ladder():
    assert [bucket_size(n) for n in (1, 64, 65, 97, 129, 1000, 1537)] == [64, 64, 96, 128, 192, 1024, 2048]
    assert bucket_sizes(2048) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert bucket_sizes(1000) == [64, 96, 128, 192, 256, 384, 512, 768, 1000]
    assert bucket_sizes(40) == [40]


def test_bucketed_batch_pads_the_unpadded_one(model, processor):
    plain = VisionDataCollator(model, processor, pad_to_bucket=False)(RECORDS)
    batch = VisionDataCollator(model, processor)(RECORDS)
    seq, patches = plain["input_ids"].shape[1], len(plain["pixel_values"])
    assert batch["input_ids"].shape[1] in bucket_sizes(MAX_SEQ) and batch["input_ids"].shape[1] >= seq
    assert len(batch["pixel_values"]) == bucket_size(patches)
    assert batch["n_pad_patches"] == bucket_size(patches) - patches == len(batch["pixel_values"]) - patches
    for key, pad in [("input_ids", processor.tokenizer.pad_token_id), ("attention_mask", 0), ("labels", -100),
                     ("mm_token_type_ids", 0)]:
        np.testing.assert_array_equal(batch[key][:, :seq], plain[key], err_msg=key)
        assert (batch[key][:, seq:] == pad).all(), key
    np.testing.assert_array_equal(batch["pixel_values"][:patches], plain["pixel_values"])
    assert (batch["pixel_values"][patches:] == 0).all()
    np.testing.assert_array_equal(batch["image_grid_thw"], plain["image_grid_thw"])


def test_text_only_batch_carries_padding_patches(model, processor):
    text_only = {"messages": [{"role": "user", "content": "what is this?"}, {"role": "assistant", "content": "two"}]}
    batch = VisionDataCollator(model, processor)([text_only])
    assert batch["pixel_values"].shape == (64, 3 * 2 * 14 * 14) and batch["n_pad_patches"] == 64
    assert batch["image_grid_thw"].shape == (0, 3)
    assert "pixel_values" not in VisionDataCollator(model, processor, pad_to_bucket=False)([text_only])


def test_each_new_bucket_shape_is_logged_once(model, processor, caplog):
    collator = VisionDataCollator(model, processor)
    with caplog.at_level(logging.INFO, logger="jaxvlm.train.collator"):
        collator(RECORDS)
        collator(RECORDS[::-1])
        collator(RECORDS[:1])
    shapes = [r.getMessage() for r in caplog.records if "new batch shape" in r.getMessage()]
    assert len(shapes) == 2 and "2 x 64 tokens, 128 image patches" in shapes[0]


def test_batches_pad_on_the_right_whatever_the_tokenizers_padding_side(model, processor):
    """for_inference sets the tokenizer's padding_side to left for generation; a collator built or called
    while it is left still pads training batches on the right, as the processor does with side right."""
    side = processor.tokenizer.padding_side
    try:
        processor.tokenizer.padding_side = "right"
        ref = processor(text=[templated(processor, r) for r in RECORDS], images=[IMAGES[:1], IMAGES[1:]],
                        padding=True, return_tensors="np")
        built_right = VisionDataCollator(model, processor, pad_to_bucket=False)
        processor.tokenizer.padding_side = "left"
        built_left = VisionDataCollator(model, processor, pad_to_bucket=False)
        batches = [built_left(RECORDS), built_right(RECORDS)]
        padded = VisionDataCollator(model, processor)(RECORDS)
    finally:
        processor.tokenizer.padding_side = side
    assert (ref["attention_mask"][:, -1] == 0).any(), "the records should differ in length"
    for batch in batches:
        np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
        np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    seq = ref["input_ids"].shape[1]
    np.testing.assert_array_equal(padded["input_ids"][:, :seq], ref["input_ids"])
    masked = (ref["attention_mask"] == 0) | np.isin(ref["input_ids"], VISION_IDS)
    np.testing.assert_array_equal(batches[0]["labels"] == -100, masked)


def test_resize_shrinks_images_over_the_size(model, processor):
    big = random_image(224, 112, seed=3)
    batch = VisionDataCollator(model, processor, resize=112, pad_to_bucket=False)([record([big])])
    shrunk = big.resize((112, 56), Image.Resampling.LANCZOS)  # width 224 -> 112, aspect kept, as Unsloth does
    ref = processor(text=[templated(processor, record([big]))], images=[shrunk], return_tensors="np")
    np.testing.assert_array_equal(batch["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(batch["pixel_values"], ref["pixel_values"])
    fixed = VisionDataCollator(model, processor, resize=(56, 56), pad_to_bucket=False)([record([big])])
    np.testing.assert_array_equal(fixed["image_grid_thw"], [[1, 4, 4]])


# ----------------------------------------------------------------------------------------------
# Sources: JSONL with relative image paths, datasets.Dataset, lists of dicts.


def write_jsonl(folder, records):
    os.makedirs(folder / "imgs", exist_ok=True)
    lines = []
    for n, rec in enumerate(records):
        rec = json.loads(json.dumps(rec, default=lambda image: None))
        for k, item in enumerate(i for m in rec["messages"] for i in m["content"] if i["type"] == "image"):
            item["image"] = f"imgs/{n}_{k}.png"
        lines.append(json.dumps(rec))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_image_paths_are_relative_to_the_file(model, processor, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "data", RECORDS)
    for name, image in [("0_0", IMAGES[0]), ("1_0", IMAGES[1]), ("1_1", IMAGES[2])]:
        image.save(tmp_path / "data" / "imgs" / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    records = load_jsonl("data/train.jsonl")
    assert records[1]["messages"][0]["content"][1]["image"] == str(tmp_path / "data" / "imgs" / "1_1.png")
    collator = VisionDataCollator(model, processor, pad_to_bucket=False)
    from_files, in_memory = collator(records), collator(RECORDS)
    for key, value in in_memory.items():
        np.testing.assert_array_equal(from_files[key], value, err_msg=key)


def test_datasets_dataset_with_inline_images_or_an_images_column(model, processor):
    datasets = pytest.importorskip("datasets")
    collator = VisionDataCollator(model, processor, pad_to_bucket=False)
    expected = collator(RECORDS)
    inline = datasets.Dataset.from_list(RECORDS)
    column = datasets.Dataset.from_list([{"messages": bare(r["messages"]), "images": images}
                                         for r, images in zip(RECORDS, [IMAGES[:1], IMAGES[1:]])])
    for dataset in (inline, column):
        batch = collator([dataset[i] for i in range(len(dataset))])
        for key, value in expected.items():
            np.testing.assert_array_equal(batch[key], value, err_msg=key)


def test_list_of_dicts_through_formatting_func(model, processor):
    raw = [{"image": IMAGES[0], "answer": "a red digit"}]
    to_chat = lambda r: record([r["image"]], answer=r["answer"])
    batch = VisionDataCollator(model, processor, formatting_func=to_chat, pad_to_bucket=False)(load_records(raw))
    np.testing.assert_array_equal(batch["input_ids"],
                                  VisionDataCollator(model, processor, pad_to_bucket=False)(RECORDS[:1])["input_ids"])


def test_max_seq_length_defaults_to_the_models(model, processor):
    assert VisionDataCollator(model, processor).max_seq_length == MAX_SEQ == model.max_seq_length


# ----------------------------------------------------------------------------------------------
# Bad input: each error names the record (and the file).


def test_record_without_an_assistant_turn_is_named(model, processor):
    no_reply = {"messages": RECORDS[0]["messages"][:1]}
    with pytest.raises(DataError, match=r"example 1 of the batch has no assistant turn"):
        VisionDataCollator(model, processor)([RECORDS[0], no_reply])
    with pytest.raises(DataError, match=r"record 17 has no assistant turn"):
        VisionDataCollator(model, processor)([RECORDS[0], no_reply], indices=[3, 17])


def test_missing_image_file_is_named(model, processor, tmp_path):
    missing = str(tmp_path / "nowhere.png")
    with pytest.raises(FileNotFoundError, match=rf"record 5: image file {re.escape(missing)} does not exist"):
        VisionDataCollator(model, processor)([record([missing])], indices=[5])
    path = write_jsonl(tmp_path, RECORDS[:1])
    image = tmp_path / "imgs" / "0_0.png"
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(path))}:1: image file {re.escape(str(image))} does not exist"):
        load_jsonl(path)


def test_unreadable_image_file_is_named(model, processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"record 2: image file {re.escape(str(broken))} could not be read"):
        VisionDataCollator(model, processor)([record([str(broken)])], indices=[2])


def test_image_tokens_cut_by_max_seq_length_raise(model, processor):
    with pytest.raises(DataError, match=r"example 0 of the batch: 36 tokens, and max_seq_length=20 would cut its "
                                        r"image tokens.*on_overflow='skip'"):
        VisionDataCollator(model, processor, max_seq_length=20)(RECORDS[:1])


def test_image_tokens_cut_by_max_seq_length_skip_the_record(model, processor, caplog):
    collator = VisionDataCollator(model, processor, max_seq_length=40, on_overflow="skip")
    with caplog.at_level(logging.WARNING, logger="jaxvlm.train.collator"):
        batch = collator(RECORDS)  # the second record: 56 tokens, its last image token at 40
    assert collator.skipped == 1 and "1 records skipped so far" in caplog.text
    assert batch["input_ids"].shape == (2, 40)
    assert not batch["attention_mask"][1].any() and (batch["labels"][1] == -100).all()
    assert batch["image_grid_thw"].tolist() == [[1, 6, 4]]


def test_a_batch_whose_every_record_is_skipped_is_padding(model, processor):
    collator = VisionDataCollator(model, processor, max_seq_length=20, on_overflow="skip")
    batch = collator(RECORDS, indices=[4, 9])
    assert collator.skipped == 2 and not batch["attention_mask"].any() and (batch["labels"] == -100).all()


def test_text_past_max_seq_length_is_truncated(model, processor):
    long_answer = record(IMAGES[:1], answer=" ".join(["one two three"] * 20))
    batch = VisionDataCollator(model, processor, max_seq_length=40, pad_to_bucket=False)([long_answer])
    full = VisionDataCollator(model, processor, max_seq_length=1000, pad_to_bucket=False)([long_answer])
    assert full["input_ids"].shape[1] > 40
    np.testing.assert_array_equal(batch["input_ids"], full["input_ids"][:, :40])


def test_empty_dataset_raises(model, processor, tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_records([])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'empty.jsonl'))}: the dataset is empty"):
        load_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="empty batch"):
        VisionDataCollator(model, processor)([])


def test_empty_datasets_dataset_raises():
    datasets = pytest.importorskip("datasets")
    with pytest.raises(DataError, match="the dataset is empty"):
        load_records(datasets.Dataset.from_list([]))


def test_response_markers_default_to_the_model_familys(model, processor):
    ours = VisionDataCollator(model, processor, train_on_responses_only=True)
    explicit = VisionDataCollator(model, processor, train_on_responses_only=True,
                                  instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n")
    assert (ours.instruction_ids, ours.response_ids) == (explicit.instruction_ids, explicit.response_ids)
    np.testing.assert_array_equal(ours(RECORDS)["labels"], explicit(RECORDS)["labels"])


def test_bad_options_are_named(model, processor):
    with pytest.raises(ValueError, match="instruction_part and response_part"):
        VisionDataCollator(model, processor, train_on_responses_only=True, instruction_part=3)
    with pytest.raises(ValueError, match="resize='large'"):
        VisionDataCollator(model, processor, resize="large")
    with pytest.raises(ValueError, match="on_overflow='drop'"):
        VisionDataCollator(model, processor, on_overflow="drop")


# ----------------------------------------------------------------------------------------------
# The model contract: padding patches change nothing.


@pytest.mark.skipif("n_pad_patches" not in inspect.signature(qwen2_vl.prepare_inputs).parameters,
                    reason="the model's prepare_inputs does not take n_pad_patches yet")
def test_bucket_padding_leaves_the_logits_unchanged(model, processor):
    plain = VisionDataCollator(model, processor, pad_to_bucket=False)(RECORDS)
    padded = VisionDataCollator(model, processor)(RECORDS)
    seq, attended = plain["input_ids"].shape[1], plain["attention_mask"].astype(bool)
    logits, padded_logits = np.asarray(model(**plain)), np.asarray(model(**padded))
    np.testing.assert_allclose(padded_logits[:, :seq][attended], logits[attended], atol=1e-5)
