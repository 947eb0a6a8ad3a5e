"""Training records: image+text conversations from a JSONL file, an HF `datasets.Dataset`, or a list of dicts.

A record holds a chat in `messages` (or `conversations`), each turn a role and a content list:

    {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "imgs/0.png"}, {"type": "text", "text": "..."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}

An image value is a `PIL.Image`, a file path, encoded bytes, or the `{"bytes": ..., "path": ...}` dict that
`datasets` stores images as. Records may instead keep their images in an `images` list, with bare
`{"type": "image"}` items marking where each goes, or use TRL's `prompt` / `completion` split. Videos go the
same way: `{"type": "video", "video": ...}` items (a video file path or a list of frames) or a `videos` list.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A training record that cannot be turned into model inputs; the message names the record."""


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file, one JSON object a line, with image paths made absolute.

    Relative image and video paths (and frame paths) are taken relative to the file's directory, so a
    dataset folder can move. Every such file must exist: a missing one raises FileNotFoundError naming
    the line and path now,
    not hours into training. Blank lines are skipped; an empty file raises DataError.
    """
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            records.append(_resolve_image_paths(record, base, where))
    if not records:
        raise DataError(f"{path}: the dataset is empty (no records)")
    return records


def load_records(data) -> Sequence[dict]:
    """Indexable records from a JSONL path, a `datasets.Dataset` or a list of dicts; raises on an empty one."""
    if isinstance(data, (str, os.PathLike)):
        return load_jsonl(data)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"training data: expected a JSONL path, a datasets.Dataset or a list of dicts, "
                        f"got {type(data).__name__}")
    if len(data) == 0:
        raise DataError("the dataset is empty (no records)")
    return data


def _resolve_image_paths(record: dict, base: str, where: str) -> dict:
    def resolve(value, kind):
        if isinstance(value, list):  # a video as a list of frames
            return [resolve(v, "video frame") for v in value]
        if not isinstance(value, str) or _is_uri(value):
            return value
        full = os.path.normpath(os.path.join(base, value))
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{where}: {kind} file {full} does not exist (given as {value!r})")
        return full

    def resolve_item(item):
        if not isinstance(item, dict):
            return item
        return {**item, **{kind: resolve(item[kind], kind) for kind in ("image", "video") if kind in item}}

    record = dict(record)
    for column, kind in (("images", "image"), ("videos", "video")):
        if isinstance(record.get(column), list):
            record[column] = [resolve(v, kind) for v in record[column]]
    for key in ("messages", "conversations", "prompt", "completion"):
        turns = record.get(key)
        if not isinstance(turns, list):
            continue
        record[key] = [
            {**turn, "content": [resolve_item(item) for item in turn["content"]]}
            if isinstance(turn, dict) and isinstance(turn.get("content"), list) else turn
            for turn in turns]
    return record


def _is_uri(value: str) -> bool:
    return value.startswith(("http://", "https://", "data:", "file://"))


def load_image(value: Any, where: str) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, encoded bytes or a `{"bytes", "path"}` dict.

    Errors name `where` (the record) and the path: FileNotFoundError for a missing file, DataError for
    bytes or a file PIL cannot decode, or a value of another kind (URLs are not fetched).
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and value.startswith("file://"):
        value = value.removeprefix("file://")
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray)):
        try:
            image = Image.open(io.BytesIO(value))
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{where}: image bytes could not be decoded ({e})") from None
    elif isinstance(value, (str, os.PathLike)):
        if isinstance(value, str) and _is_uri(value):
            raise DataError(f"{where}: image {value[:80]!r} is a URL; give a local path, bytes or a PIL image")
        if not os.path.isfile(value):
            raise FileNotFoundError(f"{where}: image file {os.fspath(value)} does not exist")
        try:
            with Image.open(value) as f:
                image = f.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{where}: image file {os.fspath(value)} could not be read ({e})") from None
    else:
        raise DataError(f"{where}: image value of type {type(value).__name__}: expected a PIL image, a path, "
                        f"bytes or a {{'bytes', 'path'}} dict")
    return image if image.mode == "RGB" else image.convert("RGB")
