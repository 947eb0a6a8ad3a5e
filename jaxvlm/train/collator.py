"""The vision data collator: chat records -> padded, bucketed numpy batches with masked labels.

`VisionDataCollator(model, processor, ...)` (also exported as `UnslothVisionDataCollator`) takes
unsloth_zoo's `UnslothVisionDataCollator` arguments with the same meanings, and returns numpy arrays:

    input_ids          int32 [batch, seq]
    attention_mask     int32 [batch, seq]      1 at tokens, 0 at padding
    labels             int32 [batch, seq]      input_ids, or ignore_index (-100) where no loss is taken
    mm_token_type_ids  int32 [batch, seq]      1 at image tokens, 2 at video tokens (when the processor returns it;
                                               `token_type_ids` for Gemma 3, as its processor names it)
    pixel_values       float32 [patches, patch_dim] (Qwen), or [images, 3, size, size] (Gemma 3): rows as the
                       family's processor gives them; rows smaller than the family's `pixel_row_shape` (Pixtral's
                       images of their own sizes, LLaVA-NeXT's tiles) are padded with zeros at the end of each
                       axis, as the processor pads a batch
    image_grid_thw     int64 [images, 3]       the real images only, in order (families whose processor gives it)
    image_sizes        int64 [images, 2]       each real image's (height, width), in order (LLaVA-NeXT, Pixtral)
    n_pad_patches      int                     with pad_to_bucket: zero rows at the end of pixel_values
  and when a record of the batch has a video:
    pixel_values_videos  float32 [video patches, patch_dim]
    video_grid_thw       int64 [videos, 3]
    second_per_grid_ts   float32 [videos]    (when the processor returns it: Qwen2.5-VL)

A video is a content item `{"type": "video", "video": value}` (or a bare `{"type": "video"}` with the record's
`videos` column), its value a video file path (decoded by the processor; PyAV for the torch-free one), a
list of frames (PIL images, paths or bytes), or a uint8 array [frames, height, width, 3]. Frames are not
resized here (the processor's video size limits apply).

Labels are NOT shifted: labels[b, t] is the target of the logits at t-1, and the loss shifts, as in
transformers. They are ignore_index at padding, at the vision placeholder tokens (<|vision_start|>,
<|image_pad|>, <|vision_end|>, ...), and with train_on_responses_only everywhere outside the assistant
responses (so at the prompt and the response marker itself).

Static shapes (pad_to_bucket=True, the default): the sequence axis is padded to the smallest bucket of
64, 96, 128, 192, 256, 384, 512, 768, ... (powers of two and their midpoints, so at most a third is
padding), with max_seq_length itself as the largest bucket; the patch axis of pixel_values is padded with
zero rows to the same ladder, uncapped. A run then compiles a few programs (about two per doubling of
length the data spans), and each new shape is logged at INFO. A batch with no image still carries
pixel_values (all padding), so text-only batches do not add programs. The padding patches belong to no
image: `n_pad_patches` says how many there are, and the model's `prepare_inputs` gives them their own
vision attention segment and drops their merged outputs. pad_to_bucket=False gives the processor's own
(unpadded) layout, with no n_pad_patches.

Differences from Unsloth: padding is masked by the attention mask,
not by token id (a pad id that is also the end-of-turn id stays trained); padding is always on the
right, whatever the tokenizer's padding_side (Unsloth pads on the tokenizer's side, which its
for_training sets to the right; for_inference sets it to the left for generation, and a collator
built or called after it must still pad training batches on the right); a sequence longer than
max_seq_length keeps its first max_seq_length tokens unless that would cut an image's tokens, which
`on_overflow` decides ("error", or "skip": the record's row becomes all padding and is counted in
`skipped`; the trainer raises DataError once a whole pass over the data leaves nothing to train on);
images are not fetched from URLs;
markers are matched as exact token sequences (Unsloth's default force_match=True); pad_to_multiple_of,
num_proc and snap_to_patch_size are not taken.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
from jinja2 import TemplateError
from PIL import Image

from jaxvlm.train.data import DataError, load_image

logger = logging.getLogger(__name__)

_SMALLEST_BUCKET = 64
# Unsloth's resize="min" falls back to 512 when the vision config names no image size (Qwen2-VL's does not).
_DEFAULT_IMAGE_SIZE = 512
_SIZE_OF = {0: lambda im: im.size[0], 1: lambda im: im.size[1],
            "max": lambda im: max(im.size), "min": lambda im: min(im.size)}
_OVERFLOW_POLICIES = ("error", "skip")


def bucket_size(n: int, limit: int | None = None, smallest: int = _SMALLEST_BUCKET) -> int:
    """The smallest bucket >= n of 64, 96, 128, 192, 256, ... (powers of two and 1.5x them, from `smallest`),
    capped at `limit`."""
    if limit is not None and n > limit:
        raise ValueError(f"length {n} is over the bucket limit {limit}")
    size = smallest
    while True:
        for bucket in (size, size * 3 // 2):
            if bucket >= n:
                return bucket if limit is None else min(bucket, limit)
        size *= 2


def bucket_sizes(limit: int) -> list[int]:
    """Every sequence bucket for max_seq_length `limit`, ascending; the last is `limit`."""
    sizes = [bucket_size(0, limit)]
    while sizes[-1] < limit:
        sizes.append(bucket_size(sizes[-1] + 1, limit))
    return sizes


def response_mask(input_ids: np.ndarray, instruction_ids: list[int], response_ids: list[int],
                  last_only: bool = False) -> np.ndarray:
    """bool [seq]: True on each assistant response, from just after a response marker up to the next
    instruction marker (or the end). With `last_only`, on the last response only."""
    starts, instructions = _find(input_ids, response_ids), _find(input_ids, instruction_ids)
    spans, end = [], 0
    for start in starts:
        if start < end:  # a marker inside the response already found
            continue
        begin = start + len(response_ids)
        later = instructions[instructions >= begin]
        end = int(later[0]) if len(later) else len(input_ids)
        spans.append((begin, end))
    mask = np.zeros(len(input_ids), bool)
    for begin, end in spans[-1:] if last_only else spans:
        mask[begin:end] = True
    return mask


def _find(ids: np.ndarray, marker: list[int]) -> np.ndarray:
    """Start positions of `marker` in `ids`."""
    if len(ids) < len(marker):
        return np.zeros(0, np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, len(marker))
    return np.flatnonzero((windows == np.asarray(marker)).all(axis=1))


@dataclasses.dataclass
class _Row:
    """One encoded record, unpadded."""
    input_ids: np.ndarray  # int [seq]
    labels: np.ndarray  # int [seq]
    mm_token_type_ids: np.ndarray | None  # int [seq] (under the processor's name: mm_token_type_ids or token_type_ids)
    pixel_values: np.ndarray | None  # float32 [rows (patches or images), *row shape]
    image_grid_thw: np.ndarray | None  # int64 [images, 3]
    image_sizes: np.ndarray | None  # int64 [images, 2]
    videos: dict[str, np.ndarray]  # pixel_values_videos, video_grid_thw, second_per_grid_ts (those returned)
    samples: dict[str, np.ndarray]  # the family's INFO.sample_arrays (those returned), less the batch axis


class VisionDataCollator:
    """Turns a list of chat records into one training batch (see the module docstring for its arrays).

    model: the model being trained; its `max_seq_length` is the default for max_seq_length (None: no limit).
    processor: the checkpoint's processor (jaxvlm.processing.load_processor).
    formatting_func: applied to each record first.
    resize: "min" (the default): shrink images whose `resize_dimension` side is over the model's image
        size (512 for Qwen2-VL, as in Unsloth) to that size, keeping the aspect ratio; an int: the same
        with that size; (width, height): resize every image to it; "max" or None: leave images as they are.
    train_on_responses_only: take the loss only on assistant responses, found by the token sequences of
        `instruction_part` and `response_part` (None: the model family's chat markers, for Qwen
        "<|im_start|>user\\n" and "<|im_start|>assistant\\n");
        `last_response_only` keeps the last response only.
    completion_only_loss: for `prompt` / `completion` records, no loss on the prompt.
    pad_to_bucket: pad the sequence and patch axes to buckets (static shapes under jit).
    on_overflow: a record whose image tokens max_seq_length would cut: "error" raises, "skip" makes its
        row all padding (no loss), logs a warning and counts it in `self.skipped`.
    """

    def __init__(self, model, processor, max_seq_length: int | None = None, formatting_func=None,
                 resize="min", ignore_index: int = -100, train_on_responses_only: bool = False,
                 instruction_part: str | None = None, response_part: str | None = None,
                 completion_only_loss: bool = True, resize_dimension=0, last_response_only: bool = False,
                 pad_to_bucket: bool = True, on_overflow: str = "error"):
        if not hasattr(processor, "image_processor"):
            raise TypeError(f"processor: expected a vision processor with an image_processor, "
                            f"got {type(processor).__name__}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if max_seq_length is None:
            max_seq_length = getattr(model, "max_seq_length", None)
        if max_seq_length is not None and max_seq_length < 1:
            raise ValueError(f"max_seq_length={max_seq_length}: expected a positive int or None")
        self.max_seq_length = max_seq_length
        self.formatting_func = formatting_func
        self.image_size = _image_size(resize, model)
        if resize_dimension not in _SIZE_OF:
            raise ValueError(f"resize_dimension={resize_dimension!r}: expected 0, 1, 'max' or 'min'")
        self.size_of = _SIZE_OF[resize_dimension]
        self.ignore_index = ignore_index
        self.completion_only_loss = completion_only_loss
        self.last_response_only = last_response_only
        self.pad_to_bucket = pad_to_bucket
        if on_overflow not in _OVERFLOW_POLICIES:
            raise ValueError(f"on_overflow={on_overflow!r}: expected one of {_OVERFLOW_POLICIES}")
        self.on_overflow = on_overflow
        self.skipped = 0

        self.instruction_ids = self.response_ids = None
        if train_on_responses_only:
            info = getattr(type(model), "INFO", None)
            if info is not None:
                instruction_part = info.instruction_part if instruction_part is None else instruction_part
                response_part = info.response_part if response_part is None else response_part
            if not (isinstance(instruction_part, str) and isinstance(response_part, str)):
                raise ValueError("train_on_responses_only=True needs instruction_part and response_part strings, "
                                 "e.g. '<|im_start|>user\\n' and '<|im_start|>assistant\\n' for Qwen2-VL")
            self.instruction_ids = self._marker_ids("instruction_part", instruction_part)
            self.response_ids = self._marker_ids("response_part", response_part)

        tok = self.tokenizer
        if tok.pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token_id; set processor.tokenizer.pad_token")
        self.pad_token_id = tok.pad_token_id
        self.image_token_id = tok.convert_tokens_to_ids(processor.image_token)
        video_token = getattr(processor, "video_token", None)
        self.media_token_ids = np.array([self.image_token_id] + ([tok.convert_tokens_to_ids(video_token)]
                                                                  if video_token else []))
        # Tokens that stand for image or video content (the family's, and the processor's): never targets.
        info = getattr(type(model), "INFO", None)
        family_tokens = info.vision_tokens if info is not None else ()
        names = [*family_tokens, *(getattr(processor, a, None) for a in ("image_token", "video_token"))]
        ids = tok.convert_tokens_to_ids([n for n in names if n])
        self.vision_token_ids = np.array(sorted({i for i in ids if i is not None and i != tok.unk_token_id}))
        # Arrays kept one row per sample (the family's), else the rows of pixel_values (patches, or whole images)
        # and their bucket ladder (the family's too).
        self.sample_arrays = dict(info.sample_arrays) if info is not None else {}
        self.sample_padding = model.sample_padding
        self.pixel_row_shape = (None if self.sample_arrays else
                                tuple(model.pixel_row_shape(processor.image_processor)))
        self.pixel_bucket_min = type(model).PIXEL_BUCKET_MIN
        self.grids = "image_grid_thw" in getattr(processor, "model_input_names", ())  # images as patch grids
        self.sizes = "image_sizes" in getattr(processor, "model_input_names", ())  # images of their own sizes
        self.type_ids_key = "mm_token_type_ids"
        self._shapes = set()

    def _marker_ids(self, name: str, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"{name}={text!r} tokenizes to nothing")
        return list(ids)

    def __call__(self, examples, indices=None) -> dict[str, np.ndarray | int]:
        """The batch for `examples`; `indices` (their dataset indices) only make error messages name them."""
        examples = list(examples)
        if not examples:
            raise DataError("empty batch: the collator was given no examples")
        if indices is not None and len(indices) != len(examples):
            raise ValueError(f"{len(indices)} indices for {len(examples)} examples")
        return self.collate(self.encode(examples, indices))

    def encode(self, examples, indices=None) -> list[_Row | None]:
        """Each record's unpadded row (None for one on_overflow="skip" skips): the processor's work, done once."""
        names = [f"record {indices[i]}" if indices is not None else f"example {i} of the batch"
                 for i in range(len(examples))]
        return [self._encode(example, name) for example, name in zip(examples, names)]

    def collate(self, rows: list[_Row | None], floor: dict[str, int] | None = None) -> dict[str, np.ndarray | int]:
        """The padded batch of `encode`'s rows. `floor` ({"seq": tokens, "pixel_rows": rows of pixel_values with
        their padding}, as `extent` gives them; pad_to_bucket only): pad to at least those sizes, so that the
        batches of several data-parallel shards share one shape (jaxvlm's trainer gives each its own)."""
        return self._collate(rows, floor or {})

    def extent(self, batch: dict) -> dict[str, int]:
        """The sizes of a batch that `collate`'s floor raises: its padded sequence length, and the rows the vision
        tower sees (pixel_values' with their padding, and pixel_values_videos')."""
        return {"seq": int(np.shape(batch["input_ids"])[1]),
                "pixel_rows": len(batch.get("pixel_values", ())) + len(batch.get("pixel_values_videos", ()))}

    # ------------------------------------------------------------------------------------------
    # One record.

    def _encode(self, example, where: str) -> _Row | None:
        """The record's unpadded row, or None when on_overflow="skip" skips it."""
        if self.formatting_func is not None:
            example = self.formatting_func(example)
        if isinstance(example, dict) and "prompt" in example and "completion" in example:
            prompt_text, completion_text, (images, videos) = self._render_prompt_completion(example, where)
        else:
            prompt_text, (images, videos) = self._render_messages(example, where)
            completion_text = None
        images = [self._resize(load_image(value, where)) for value in images]
        videos = [_video(value, where) for value in videos]
        if videos and getattr(self.processor, "video_processor", None) is None:
            raise DataError(f"{where} has a video, and the processor ({type(self.processor).__name__}) takes none")
        try:
            out = self.processor(text=[prompt_text], images=images or None, videos=videos or None,
                                 return_tensors="np", add_special_tokens=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{where}: the processor rejected the record: {e}") from e
        ids = out["input_ids"][0]
        samples = {k: np.asarray(out[k])[0] for k in self.sample_arrays if out.get(k) is not None}
        self.type_ids_key = next((k for k in _TYPE_IDS_KEYS if k in out), self.type_ids_key)
        mm = out[self.type_ids_key][0] if self.type_ids_key in out else None
        n_prompt = 0
        if completion_text is not None:
            completion = np.asarray(self.tokenizer(completion_text, add_special_tokens=False)["input_ids"], ids.dtype)
            n_prompt = len(ids)
            ids = np.concatenate([ids, completion])
            mm = None if mm is None else np.concatenate([mm, np.zeros_like(completion)])
            samples = self._extend_seq(samples, len(ids))

        if self.max_seq_length is not None and len(ids) > self.max_seq_length:
            image_at = np.flatnonzero(np.isin(ids, self.media_token_ids))
            if len(image_at) and image_at[-1] >= self.max_seq_length:
                message = (f"{where}: {len(ids)} tokens, and max_seq_length={self.max_seq_length} would cut its "
                           f"image tokens (image or video: the last of {len(image_at)} is at position "
                           f"{image_at[-1]}); raise max_seq_length or shrink the images (resize=) or videos")
                if self.on_overflow == "error":
                    raise DataError(message + ", or pass on_overflow='skip'")
                self.skipped += 1
                logger.warning("%s; skipped (%d records skipped so far)", message, self.skipped)
                return None
            ids = ids[:self.max_seq_length]
            mm = None if mm is None else mm[:self.max_seq_length]
            samples = {k: _slice_axis(v, self.sample_arrays[k].index("seq"), self.max_seq_length)
                       if "seq" in self.sample_arrays[k] else v for k, v in samples.items()}

        trained = ~np.isin(ids, self.vision_token_ids)
        if self.response_ids is not None:
            responses = response_mask(ids, self.instruction_ids, self.response_ids, self.last_response_only)
            if not responses.any():
                logger.warning("%s: no response_part %r in its tokens, so nothing in it is trained on",
                               where, self.tokenizer.decode(self.response_ids))
            trained &= responses
        if self.completion_only_loss:
            trained[:n_prompt] = False
        return _Row(input_ids=ids, labels=np.where(trained, ids, self.ignore_index), mm_token_type_ids=mm,
                    pixel_values=None if self.sample_arrays else out.get("pixel_values"),
                    image_grid_thw=out.get("image_grid_thw"), image_sizes=out.get("image_sizes"),
                    videos={k: out[k] for k in _VIDEO_KEYS if out.get(k) is not None}, samples=samples)

    def _extend_seq(self, samples: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
        """`samples` with their "seq" axes extended to `length` by repeating the last token's row (tokens after
        the prompt see what its last token sees, as the processor's masks give it for text after an image)."""
        out = {}
        for k, v in samples.items():
            axes = self.sample_arrays[k]
            axis = axes.index("seq") if "seq" in axes else None
            if axis is not None and v.shape[axis] < length:
                n = v.shape[axis]
                last = (np.take(v, [n - 1], axis=axis) if n else
                        np.zeros((*v.shape[:axis], 1, *v.shape[axis + 1:]), v.dtype))
                v = np.concatenate([v, np.repeat(last, length - n, axis=axis)], axis=axis)
            out[k] = v
        return out

    def _render_messages(self, example, where: str) -> tuple[str, tuple[list, list]]:
        """The chat-templated text of a `messages` record and its (image values, video values), in order."""
        if isinstance(example, dict):
            turns = example.get("messages", example.get("conversations"))
            if turns is None:
                raise DataError(f"{where}: no 'messages' (or 'conversations'); keys are {sorted(example)}")
            columns = {"image": example.get("images"), "video": example.get("videos")}
        else:
            turns, columns = example, {}
        turns, images = _chat_turns(turns, columns, where)
        if not any(turn["role"] == "assistant" for turn in turns):
            raise DataError(f"{where} has no assistant turn (roles: {[t['role'] for t in turns]}): "
                            f"nothing to train on")
        return self._template(turns, where), images

    def _render_prompt_completion(self, example, where: str) -> tuple[str, str, tuple[list, list]]:
        """(prompt text, completion text, (image values, video values)) of a TRL prompt/completion record."""
        prompt, completion = example["prompt"], example["completion"]
        columns = {"image": example.get("images"), "video": example.get("videos")}
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise DataError(f"{where} has no assistant turn: its completion is empty")
            return prompt, completion, (list(columns["image"] or []), list(columns["video"] or []))
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DataError(f"{where}: prompt and completion must both be message lists or both strings")
        turns, images = _chat_turns(prompt + completion, columns, where)
        if not any(turn["role"] == "assistant" for turn in turns[len(prompt):]):
            raise DataError(f"{where} has no assistant turn in its completion")
        if any(_media_kind(item) for turn in turns[len(prompt):] if isinstance(turn["content"], list)
               for item in turn["content"]):
            raise DataError(f"{where}: images or videos in the completion are not supported; put them in the prompt")
        prompt_text = self._template(turns[:len(prompt)], where, add_generation_prompt=True)
        full_text = self._template(turns, where)
        # The template may render the end of the prompt differently once a reply follows (TRL does the same).
        prompt_text = os.path.commonprefix([prompt_text, full_text])
        return prompt_text, full_text[len(prompt_text):], images

    def _template(self, turns: list[dict], where: str, add_generation_prompt: bool = False) -> str:
        try:
            return self.processor.apply_chat_template(turns, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except (TypeError, KeyError, TemplateError) as e:
            raise DataError(f"{where}: the chat template failed on the record ({type(e).__name__}: {e})") from e

    def _resize(self, image: Image.Image) -> Image.Image:
        if self.image_size is None:
            return image
        if isinstance(self.image_size, tuple):
            return image.resize(self.image_size, Image.Resampling.LANCZOS)
        side = self.size_of(image)
        if side <= self.image_size:
            return image
        w, h = image.size
        size = (max(1, (w * self.image_size + side // 2) // side), max(1, (h * self.image_size + side // 2) // side))
        return image.resize(size, Image.Resampling.LANCZOS)

    # ------------------------------------------------------------------------------------------
    # The batch.

    def _collate(self, rows: list[_Row | None], floor: dict[str, int]) -> dict[str, np.ndarray | int]:
        kept = [row for row in rows if row is not None]
        longest = max((len(row.input_ids) for row in kept), default=0)
        seq = bucket_size(longest, self.max_seq_length) if self.pad_to_bucket else longest
        if floor and not self.pad_to_bucket:
            raise ValueError("collate(floor=...) pads to shared sizes; it needs pad_to_bucket=True")
        seq = max(seq, floor.get("seq", 0))
        empty = np.zeros(0, np.int32)
        batch = {
            "input_ids": self._pad([empty if r is None else r.input_ids for r in rows], seq, self.pad_token_id),
            "attention_mask": self._pad([empty if r is None else np.ones(len(r.input_ids)) for r in rows], seq, 0),
            "labels": self._pad([empty if r is None else r.labels for r in rows], seq, self.ignore_index),
        }
        if all(row.mm_token_type_ids is not None for row in kept):
            batch[self.type_ids_key] = self._pad([empty if r is None else r.mm_token_type_ids for r in rows], seq, 0)

        if self.sample_arrays:
            batch.update(self._stack_samples(rows, seq))
        pixels = [np.asarray(row.pixel_values) for row in kept if row.pixel_values is not None]
        if pixels:
            row_shape = (self.pixel_row_shape if self.pad_to_bucket else
                         tuple(np.max([p.shape[1:] for p in pixels], axis=0)))
            pixels = [_pad_to_shape(p, row_shape) for p in pixels]
        grids = [row.image_grid_thw for row in kept if row.image_grid_thw is not None]
        sizes = [row.image_sizes for row in kept if row.image_sizes is not None]
        videos = {k: [row.videos[k] for row in kept if k in row.videos] for k in _VIDEO_KEYS}
        for k, parts in videos.items():
            if parts:
                batch[k] = np.concatenate(parts).astype(np.float32 if k != "video_grid_thw" else np.int64)
        n_video_patches = len(batch.get("pixel_values_videos", ()))
        if self.pad_to_bucket and not self.sample_arrays:
            # One bucket for all the patches the vision tower sees (the model joins images and videos).
            n_patches = sum(len(p) for p in pixels)
            n_pad = (max(bucket_size(n_patches + n_video_patches, smallest=self.pixel_bucket_min),
                         floor.get("pixel_rows", 0)) - n_patches - n_video_patches)
            pixels.append(np.zeros((n_pad, *self.pixel_row_shape), np.float32))
            batch["pixel_values"] = np.concatenate(pixels).astype(np.float32)
            if grids or self.grids:
                batch["image_grid_thw"] = np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)
            if sizes or self.sizes:
                batch["image_sizes"] = np.concatenate(sizes).astype(np.int64) if sizes else np.zeros((0, 2), np.int64)
            batch["n_pad_patches"] = n_pad
            self._log_new_shape(len(rows), seq, n_patches + n_video_patches + n_pad)
        elif pixels:
            batch["pixel_values"] = np.concatenate(pixels).astype(np.float32)
            if grids:
                batch["image_grid_thw"] = np.concatenate(grids)
            if sizes:
                batch["image_sizes"] = np.concatenate(sizes).astype(np.int64)
        return batch

    def _stack_samples(self, rows: list[_Row | None], seq: int) -> dict[str, np.ndarray]:
        """The family's per-sample arrays stacked over the batch: "seq" axes extended to `seq` as `_extend_seq`
        does, "images" axes padded to the batch's most images with the family's `sample_padding` (zeros, unless it
        says otherwise), as are the rows of samples without images (or skipped). The image count is not bucketed:
        as the processor pads a batch, since a family may let padding images weigh in (transformers' Llama 3.2
        Vision lets text rows that see no image attend to all of them). A batch with no image has none of these arrays (its cross-attention is skipped)."""
        kept = [row for row in rows if row is not None and row.samples]
        if not kept:
            return {}
        images = max(v.shape[self.sample_arrays[k].index("images")] for row in kept for k, v in row.samples.items()
                     if "images" in self.sample_arrays[k])
        out = {}
        for k, axes in self.sample_arrays.items():
            parts = [row.samples[k] for row in kept if k in row.samples]
            if not parts:
                continue
            sizes = {"seq": seq, "images": images}
            shape = [sizes[a] for a in axes] + list(parts[0].shape[len(axes):])
            stacked = self.sample_padding(k, (len(rows), *shape), parts[0].dtype)
            for i, row in enumerate(rows):
                if row is None or k not in row.samples:
                    continue
                v = self._extend_seq({k: row.samples[k]}, seq)[k]
                stacked[(i, *(slice(0, n) for n in v.shape))] = v
            out[k] = stacked
        return out

    def _pad(self, seqs: list[np.ndarray], length: int, value: int) -> np.ndarray:
        """int32 [len(seqs), length]: each sequence at the start of its row, `value` after it."""
        out = np.full((len(seqs), length), value, np.int32)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = s
        return out

    def _log_new_shape(self, batch: int, seq: int, patches: int):
        if (batch, seq, patches) not in self._shapes:
            self._shapes.add((batch, seq, patches))
            logger.info("new batch shape: %d x %d tokens, %d image patches (the train step compiles for it; "
                        "%d shapes so far)", batch, seq, patches, len(self._shapes))


UnslothVisionDataCollator = VisionDataCollator

def _pad_to_shape(rows: np.ndarray, row_shape: tuple[int, ...]) -> np.ndarray:
    """`rows [n, *shape]` with zeros after the end of each axis of `shape` up to `row_shape`."""
    if rows.shape[1:] == tuple(row_shape):
        return rows
    if len(rows.shape) - 1 != len(row_shape) or any(a > b for a, b in zip(rows.shape[1:], row_shape)):
        raise ValueError(f"the processor's pixel_values rows have shape {rows.shape[1:]}, larger than the model's "
                         f"{tuple(row_shape)}: the processor's image size limits differ from the model's")
    return np.pad(rows, [(0, 0)] + [(0, b - a) for a, b in zip(rows.shape[1:], row_shape)])


def _slice_axis(v: np.ndarray, axis: int, length: int) -> np.ndarray:
    return v[(slice(None),) * axis + (slice(0, length),)]


_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
_TYPE_IDS_KEYS = ("mm_token_type_ids", "token_type_ids")


def _media_kind(item) -> str | None:
    """"image" or "video" for a content item standing for one, else None."""
    if not isinstance(item, dict):
        return None
    for kind in ("image", "video"):
        if item.get("type") == kind or item.get(kind) is not None:
            return kind
    return None


def _video(value, where: str):
    """A video value as the processor takes it: a file path (checked to exist), a uint8 array
    [frames, height, width, 3], or a list of RGB PIL frames (from PIL images, paths or bytes)."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("bytes")
    if isinstance(value, str) and value.startswith("file://"):
        value = value.removeprefix("file://")
    if isinstance(value, (str, os.PathLike)):
        if isinstance(value, str) and value.startswith(("http://", "https://", "data:")):
            raise DataError(f"{where}: video {value[:80]!r} is a URL; give a local path or a list of frames")
        if not os.path.isfile(value):
            raise FileNotFoundError(f"{where}: video file {os.fspath(value)} does not exist")
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        if value.ndim != 4 or value.shape[-1] != 3:
            raise DataError(f"{where}: a video array must be [frames, height, width, 3], got shape {value.shape}")
        return value
    if isinstance(value, (list, tuple)) and value:
        return [load_image(frame, f"{where}, video frame {i}") for i, frame in enumerate(value)]
    raise DataError(f"{where}: video value of type {type(value).__name__}: expected a file path, a non-empty list "
                    f"of frames or a [frames, height, width, 3] array")


def _chat_turns(turns, columns: dict, where: str) -> tuple[list[dict], tuple[list, list]]:
    """The turns as the chat template wants them, and their (image values, video values) in order.

    Keys whose value is None are dropped (datasets stores every key of every content item; Qwen's
    template would read a text item with `image: None` as an image), and image / video items become bare
    `{"type": "image"}` / `{"type": "video"}`. Values come from the items themselves or, for bare items,
    from the record's `images` / `videos` column (`columns["image"]`, `columns["video"]`).
    """
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected messages as a non-empty list of {{'role', 'content'}} dicts")
    out, inline = [], {"image": [], "video": []}
    for n, turn in enumerate(turns):
        if not (isinstance(turn, dict) and "role" in turn and "content" in turn):
            raise DataError(f"{where}: message {n} is not a {{'role', 'content'}} dict: {str(turn)[:100]}")
        content = turn["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                if not isinstance(item, dict):
                    raise DataError(f"{where}: message {n} has a content item that is not a dict: {str(item)[:100]}")
                item = {k: v for k, v in item.items() if v is not None}
                kind = _media_kind(item)
                if kind:
                    inline[kind].append(item.get(kind))
                    item = {"type": kind}
                items.append(item)
            content = items
        elif not isinstance(content, str):
            raise DataError(f"{where}: message {n} content must be a string or a list of items, "
                            f"got {type(content).__name__}")
        out.append({"role": turn["role"], "content": content})
    return out, (_media_values("image", inline["image"], columns.get("image"), where),
                 _media_values("video", inline["video"], columns.get("video"), where))


def _media_values(kind: str, inline: list, column, where: str) -> list:
    """The values of a record's `kind` items: inline, or from its column (`images` / `videos`)."""
    if column is not None:
        column = list(column)
        if any(value is not None for value in inline):
            raise DataError(f"{where}: {kind}s both in the messages and in the '{kind}s' column; use one")
        if len(column) != len(inline):
            raise DataError(f"{where}: {len(inline)} {kind} items in the messages but {len(column)} "
                            f"{kind}s in the '{kind}s' column")
        return column
    if any(value is None for value in inline):
        raise DataError(f"{where}: {'an' if kind == 'image' else 'a'} {kind} item has no '{kind}' value (and the record has no '{kind}s' column)")
    return inline


def _image_size(resize, model):
    """The resize target: None (no resizing), an int side, or a (width, height) tuple."""
    if resize == "min":
        config = getattr(model, "config", None)
        vision = getattr(config, "vision", None) or getattr(config, "vision_config", None)
        return getattr(vision, "image_size", None) or _DEFAULT_IMAGE_SIZE
    if resize is None or resize == "max":
        return None
    if isinstance(resize, int) and not isinstance(resize, bool) and resize > 0:
        return resize
    if (isinstance(resize, (tuple, list)) and len(resize) == 2
            and all(isinstance(x, int) and x > 0 for x in resize)):
        return tuple(resize)
    raise ValueError(f"resize={resize!r}: expected 'min', 'max', None, a positive int or a (width, height) tuple")
