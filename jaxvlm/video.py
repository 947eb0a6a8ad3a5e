"""Video input for the Qwen VLM processors, with numpy and PIL only (no torch, no torchvision).

transformers' video processors are written in torch and resize with torchvision, so without torchvision a
transformers processor has no video processor. This module has the two the Qwen families use, computing
what `Qwen2VLVideoProcessor` (Qwen2-VL, Qwen2.5-VL) and `Qwen3VLVideoProcessor` (Qwen3-VL) compute for the
same inputs and the same config values: frame sampling, the (video) smart resize, rescale and normalize,
padding of the frame count to a multiple of `temporal_patch_size` with copies of the last frame, the patch
layout of `pixel_values_videos [patches, C*T*P*P]`, `video_grid_thw`, and the per-video `VideoMetadata`
from which the processors write Qwen3-VL's `<t seconds>` timestamps and Qwen2.5-VL's `second_per_grid_ts`.

One thing differs on purpose: each frame is resized with PIL exactly as transformers' PIL image processor
(`Qwen2VLImageProcessorPil`) resizes an image, then rescaled and normalized as it does, so a frame gives the
pixels an image gives. torchvision's antialiased bicubic resize rounds a little differently from PIL's: the
pixel values then differ from the torchvision processor's by at most a few uint8 steps after resizing
(tests/test_video_processing.py measures it); sizes, token counts, ids and metadata are identical.

The classes are transformers `VideoProcessorMixin`s with the PIL backend, so their config loading
(processor_config.json's "video_processor", else video_preprocessor_config.json, else
preprocessor_config.json), keyword handling and `save_pretrained` are transformers' own; `to_dict` writes
transformers' class name, so a saved directory loads in transformers with torchvision as well.

Video files are decoded with PyAV (`pip install 'jaxvlm[video]'`), imported only when a file is read.
"""
from __future__ import annotations

import logging
import math
import os
from typing import ClassVar

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN,
                                      OPENAI_CLIP_STD, PILImageResampling, SizeDict,
                                      infer_channel_dimension_format)
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import (VideoMetadata, is_valid_video, make_batched_metadata,
                                      make_batched_videos)

__all__ = ["DEFAULT_FPS", "VideoMetadata", "load_video", "decode_video", "smart_resize", "smart_resize_video",
           "patchify", "Qwen2VLVideoProcessorPil", "Qwen3VLVideoProcessorPil", "VIDEO_PROCESSORS",
           "video_processor_class", "load_video_processor"]

logger = logging.getLogger(__name__)

# The frame rate transformers assumes for frames that come without one (a list of frames, no video_metadata):
# Qwen3-VL's sampling and timestamps and Qwen2.5-VL's second_per_grid_ts use it.
DEFAULT_FPS = 24
_AV_MISSING = "reading a video file needs PyAV: pip install 'jaxvlm[video]' (or pip install av)"


# -- frames and files -----------------------------------------------------------------------------------


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError(_AV_MISSING) from e
    return av


def decode_video(path, sample_indices_fn=None, fps: float | None = None) -> tuple[np.ndarray, VideoMetadata]:
    """(frames uint8 `[T, H, W, 3]` RGB, metadata) of the first video stream of file `path`, with PyAV.

    The metadata holds the container's frame count and average frame rate, as transformers' PyAV reader
    records them. `sample_indices_fn(metadata=...)` picks the frames to keep (a video processor's
    `sample_frames`); without it every frame is kept. `metadata.frames_indices` are the kept frames' indices.
    `fps` replaces the container's frame rate (for files that store a wrong one).
    """
    av = _import_av()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path} does not exist")
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        rate = fps if fps is not None else (float(stream.average_rate) if stream.average_rate else None)
        total = int(stream.frames)
        decoded = None
        if total <= 0:  # the container does not say: count by decoding
            decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            total = len(decoded)
            container.seek(0)
        metadata = VideoMetadata(total_num_frames=total, fps=rate, duration=total / rate if rate else 0.0,
                                 video_backend="pyav", height=stream.height, width=stream.width)
        indices = (np.arange(total) if sample_indices_fn is None else sample_indices_fn(metadata=metadata))
        wanted = [int(i) for i in np.asarray(indices).reshape(-1)]
        if not wanted:
            raise ValueError(f"{path}: no frames were selected")
        kept = {}
        if decoded is not None:
            kept = {i: decoded[i] for i in wanted if i < len(decoded)}
        else:
            last, wanted_set = max(wanted), set(wanted)
            for i, frame in enumerate(container.decode(stream)):
                if i > last:
                    break
                if i in wanted_set:
                    kept[i] = frame.to_ndarray(format="rgb24")
    missing = sorted(set(wanted) - kept.keys())
    if missing:
        raise ValueError(f"{path}: frames {missing[:5]} were asked for but the file decodes only "
                         f"{max(kept, default=-1) + 1} of the {total} frames it declares")
    metadata.frames_indices = indices
    return np.stack([kept[i] for i in wanted]), metadata


def load_video(video, fps: float | None = None) -> tuple[np.ndarray, VideoMetadata]:
    """(frames `[T, H, W, C]`, metadata) of a video given as a file path, an array `[T, H, W, C]`, or a
    list of frames (PIL images or `[H, W, C]` arrays).

    A file is decoded with PyAV (frame count and frame rate from the container). Frames come with no
    frame rate: `fps` gives it; left None, the processors assume what transformers assumes
    (`DEFAULT_FPS` for Qwen3-VL's timestamps and Qwen2.5-VL's `second_per_grid_ts`; Qwen2-VL's fps
    sampling refuses). Pass the metadata on as `processor(..., videos=[frames], video_metadata=[metadata])`.
    """
    if isinstance(video, (str, os.PathLike)):
        return decode_video(video, fps=fps)
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"a video array must be [frames, height, width, channels], got shape {video.shape}")
        frames = video
    elif isinstance(video, (list, tuple)) and video:
        frames = np.stack([np.asarray(frame) for frame in video])
        if frames.ndim == 3:  # single-channel frames
            frames = frames[..., None]
        if frames.ndim != 4:
            raise ValueError(f"video frames must be PIL images or [height, width, channels] arrays, "
                             f"got frames of shape {frames.shape[1:]}")
    else:
        raise TypeError(f"a video is a file path, a [T, H, W, C] array or a non-empty list of frames, "
                        f"got {type(video).__name__}")
    total = len(frames)
    metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps if fps else None,
                             height=frames.shape[1], width=frames.shape[2], frames_indices=list(range(total)))
    return frames, metadata


# -- sizes ----------------------------------------------------------------------------------------------


def _check_aspect(height, width):
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) a Qwen2-VL frame (or image) is resized to: multiples of `factor` near the frame's
    own size, the aspect ratio kept, scaled to min_pixels <= height * width <= max_pixels when outside."""
    _check_aspect(height, width)
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    return new_h, new_w


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) Qwen3-VL resizes a video's frames to: as `smart_resize`, but the pixel budget counts
    all frames (frames rounded to a multiple of `temporal_factor`), and frames smaller than `factor` are
    first scaled up to it."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        up = max(factor / height, factor / width)
        height, width = int(height * up), int(width * up)
    _check_aspect(height, width)
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    new_t = round(num_frames / temporal_factor) * temporal_factor
    if new_t * new_h * new_w > max_pixels:
        shrink = math.sqrt(num_frames * height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_t * new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (num_frames * height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    return new_h, new_w


# -- the processors -------------------------------------------------------------------------------------


class _QwenVideoKwargs(VideosKwargs, total=False):
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int


class _Qwen2VLVideoKwargs(_QwenVideoKwargs, total=False):
    min_pixels: int
    max_pixels: int


class _QwenVideoProcessorPil(VideoProcessorMixin, PilBackend):
    """What the Qwen video processors share: decoding and sampling, frames processed as the PIL image
    processor processes images, and the patch layout. Subclasses give the sampling and the target size."""

    TRANSFORMERS_CLASS: ClassVar[str]
    resample = PILImageResampling.BICUBIC
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    temporal_patch_size = 2
    merge_size = 2
    min_frames = 4
    max_frames = 768
    cap_pixels_per_frame = None
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def to_dict(self):
        # transformers' name: a saved processor then loads in transformers too (with torchvision there).
        return {**super().to_dict(), "video_processor_type": self.TRANSFORMERS_CLASS}

    # -- decoding, sampling, channel layout

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
        """Decodes video file paths with PyAV: (frames, metadata), or lists of them for a list of paths."""
        if isinstance(video_url_or_urls, (list, tuple)):
            return tuple(map(list, zip(*[self.fetch_videos(v, sample_indices_fn) for v in video_url_or_urls])))
        if isinstance(video_url_or_urls, str) and video_url_or_urls.startswith(("http://", "https://")):
            raise ValueError(f"{video_url_or_urls}: jaxvlm reads local video files only; download it first")
        return decode_video(video_url_or_urls, sample_indices_fn)

    def _decode_and_sample_videos(self, videos, video_metadata, do_sample_frames=None, sample_indices_fn=None):
        videos = make_batched_videos(videos)
        # transformers stacks lists of frames only when the first video is one; stack them all.
        videos = [np.stack([np.asarray(frame) for frame in video])
                  if isinstance(video, (list, tuple)) and is_valid_video(video) else video for video in videos]
        video_metadata = make_batched_metadata(videos, video_metadata=video_metadata)
        out_videos, out_metadata = [], []
        for video, metadata in zip(videos, video_metadata):
            if is_valid_video(video):
                if do_sample_frames:
                    indices = sample_indices_fn(metadata=metadata)
                    metadata.frames_indices = indices
                    video = video[indices]
            elif isinstance(video, (list, tuple)):  # a video given as a list of image paths
                if do_sample_frames:
                    raise ValueError("Sampling frames from a list of images is not supported! "
                                     "Set `do_sample_frames=False`.")
                video = np.stack([self.process_image(image) for image in self.fetch_images(list(video))])
            else:
                video, metadata = self.fetch_videos(video, sample_indices_fn=sample_indices_fn)
            out_videos.append(video)
            out_metadata.append(metadata)
        return out_videos, out_metadata

    def _prepare_input_videos(self, videos, do_convert_rgb=None, input_data_format=None, device=None):
        """Each video as a list of channels-first frames, RGB when `do_convert_rgb`, as the PIL image
        processor prepares an image."""
        prepared = []
        for video in videos:
            video = np.asarray(video)
            layout = input_data_format or infer_channel_dimension_format(video, num_channels=(1, 3, 4))
            prepared.append([self.process_image(frame, do_convert_rgb=do_convert_rgb, input_data_format=layout)
                             for frame in video])
        return prepared

    def sample_frames(self, metadata, **kwargs):
        raise NotImplementedError

    # -- resize, rescale, normalize, patches

    def _target_size(self, num_frames, height, width, size, factor, temporal_factor, cap_pixels_per_frame):
        raise NotImplementedError

    def _preprocess(self, videos, do_resize, size, resample, do_rescale, rescale_factor, do_normalize,
                    image_mean, image_std, patch_size=None, temporal_patch_size=None, merge_size=None,
                    cap_pixels_per_frame=None, return_tensors=None, **kwargs):
        if cap_pixels_per_frame is None:
            cap_pixels_per_frame = False  # transformers' default while the option is unset
        all_patches, grids = [], []
        for frames in videos:
            height, width = frames[0].shape[-2:]
            if do_resize:
                height, width = self._target_size(len(frames), height, width, size, patch_size * merge_size,
                                                  temporal_patch_size, cap_pixels_per_frame)
            processed = []
            for frame in frames:  # Qwen2VLImageProcessorPil's steps for one image
                if do_resize:
                    frame = self.resize(frame, SizeDict(height=height, width=width), resample=resample)
                if do_rescale:
                    frame = self.rescale(frame, rescale_factor)
                if do_normalize:
                    frame = self.normalize(frame, image_mean, image_std)
                processed.append(np.asarray(frame, dtype=np.float32))
            patches, grid = patchify(np.stack(processed), patch_size, merge_size, temporal_patch_size)
            all_patches.append(patches)
            grids.append(grid)
        return BatchFeature(data={"pixel_values_videos": np.concatenate(all_patches),
                                  "video_grid_thw": np.array(grids, dtype=np.int64)}, tensor_type=return_tensors)

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        """The number of patches (`prod(video_grid_thw)`) of a video of this many frames and this size."""
        videos_kwargs = videos_kwargs or {}
        size = videos_kwargs.get("size") or self.size
        size = size if isinstance(size, SizeDict) else SizeDict(**size)
        patch_size = videos_kwargs.get("patch_size") or self.patch_size
        merge_size = videos_kwargs.get("merge_size") or self.merge_size
        temporal = videos_kwargs.get("temporal_patch_size") or self.temporal_patch_size
        cap = videos_kwargs.get("cap_pixels_per_frame") or self.cap_pixels_per_frame
        h, w = self._target_size(num_frames, height, width, size, patch_size * merge_size, temporal,
                                 self._counts_cap and bool(cap))
        return -(-num_frames // temporal) * (h // patch_size) * (w // patch_size)

    _counts_cap = True


def patchify(video: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
    """(patches `[grid_t*grid_h*grid_w, C*temporal_patch_size*P*P]`, [grid_t, grid_h, grid_w]) of frames
    `[T, C, H, W]`: the frame count padded with copies of the last frame to a multiple of
    temporal_patch_size; patches in (t, h-block, w-block, h-in-block, w-in-block) order with
    merge_size-square blocks, each patch (channel, time, row, column)."""
    if pad := -len(video) % temporal_patch_size:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    frames, channels, height, width = video.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(f"frames of {height}x{width} pixels do not split into {patch_size * merge_size}-pixel "
                         f"blocks (patch_size * merge_size): resize them (do_resize=True)")
    grid_t, grid_h, grid_w = frames // temporal_patch_size, height // patch_size, width // patch_size
    blocks = video.reshape(grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                           grid_w // merge_size, merge_size, patch_size)
    # -> (t, h-block, w-block, h-in-block, w-in-block, channel, time, row, column)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = blocks.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(patches), [grid_t, grid_h, grid_w]


class Qwen2VLVideoProcessorPil(_QwenVideoProcessorPil):
    """transformers' `Qwen2VLVideoProcessor` (Qwen2-VL and Qwen2.5-VL) without torch: the same config,
    keywords and outputs; frames resized with PIL (see the module docstring)."""

    TRANSFORMERS_CLASS = "Qwen2VLVideoProcessor"
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    patch_size = 14
    do_sample_frames = False
    max_video_tokens = 128000
    valid_kwargs = _Qwen2VLVideoKwargs
    _counts_cap = False  # transformers' Qwen2-VL patch count leaves the per-frame cap out

    def __init__(self, **kwargs):
        # Older configs give the pixel bounds as min_pixels / max_pixels.
        size = dict(kwargs.pop("size", None) or self.size)
        if (min_pixels := kwargs.pop("min_pixels", None)) is not None:
            size["shortest_edge"] = min_pixels
            size.pop("min_pixels", None)
        if (max_pixels := kwargs.pop("max_pixels", None)) is not None:
            size["longest_edge"] = max_pixels
            size.pop("max_pixels", None)
        super().__init__(size=size, **kwargs)

    def _standardize_kwargs(self, size=None, min_pixels=None, max_pixels=None, **kwargs):
        if min_pixels is not None or max_pixels is not None:  # call-time bounds override `size`
            bounds = dict(size) if isinstance(size, (dict, SizeDict)) else {}
            if min_pixels is not None:
                bounds["shortest_edge"] = min_pixels
            if max_pixels is not None:
                bounds["longest_edge"] = max_pixels
            size = SizeDict(**{k: v for k, v in bounds.items() if v is not None})
        return super()._standardize_kwargs(size=size, **kwargs)

    def sample_frames(self, metadata, temporal_patch_size=None, min_frames=None, max_frames=None,
                      num_frames=None, fps=None, **kwargs):
        """Indices of the frames to keep: `num_frames` (rounded to a multiple of temporal_patch_size), or
        `fps` frames per second of the source (needs the source's fps; clamped to min/max_frames and the
        frame count, rounded down to a multiple of temporal_patch_size), evenly spaced from frame 0;
        every frame when neither is set."""
        if fps is not None and num_frames is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        num_frames = num_frames if num_frames is not None else self.num_frames
        fps = fps if fps is not None else self.fps
        temporal = temporal_patch_size if temporal_patch_size is not None else self.temporal_patch_size
        min_frames = min_frames if min_frames is not None else self.min_frames
        max_frames = max_frames if max_frames is not None else self.max_frames
        total = metadata.total_num_frames
        if num_frames is not None:
            num_frames = round(num_frames / temporal) * temporal
        elif fps is not None:
            if metadata is None or metadata.fps is None:
                raise ValueError("Asked to sample `fps` frames per second but no video metadata was provided which "
                                 "is required when sampling with `fps`. Please pass in `VideoMetadata` object or use "
                                 "a fixed `num_frames` per input video")
            top = math.floor(min(max_frames, total) / temporal) * temporal
            wanted = min(max(total / metadata.fps * fps, min_frames), top, total)
            num_frames = math.floor(wanted / temporal) * temporal
        if num_frames is None:
            return np.arange(total, dtype=np.int32)
        if num_frames > total:
            raise ValueError(f"Video can't be sampled. The inferred `num_frames={num_frames}` exceeds "
                             f"`total_num_frames={total}`. Decrease `num_frames` or `fps` for sampling.")
        # As torch.arange(0, total, total / num_frames).int(): float32 values (computed in float64), truncated.
        return np.arange(0, total, total / num_frames, dtype=np.float64).astype(np.float32).astype(np.int32)

    def _target_size(self, num_frames, height, width, size, factor, temporal_factor, cap_pixels_per_frame):
        if not size.shortest_edge or not size.longest_edge:
            raise ValueError(f"`size` dict must contain 'shortest_edge' and 'longest_edge' keys but got {size}.")
        max_pixels = size.longest_edge
        if cap_pixels_per_frame:  # each frame also gets at most its share of a whole-video budget
            budget = int(self.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, budget * temporal_factor // num_frames), int(size.shortest_edge * 1.05))
        return smart_resize(height, width, factor=factor, min_pixels=size.shortest_edge, max_pixels=max_pixels)


class Qwen3VLVideoProcessorPil(_QwenVideoProcessorPil):
    """transformers' `Qwen3VLVideoProcessor` without torch: the same config, keywords and outputs; frames
    resized with PIL (see the module docstring)."""

    TRANSFORMERS_CLASS = "Qwen3VLVideoProcessor"
    size = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    patch_size = 16
    do_sample_frames = True
    max_video_tokens = 768
    fps = 2
    num_frames = None
    valid_kwargs = _QwenVideoKwargs

    def sample_frames(self, metadata, num_frames=None, fps=None, **kwargs):
        """Indices of the frames to keep, evenly spaced from the first frame to the last (rounded):
        `num_frames`, or `fps` frames per second of the source clamped to the processor's min/max_frames
        and the frame count. A source without an fps is taken as DEFAULT_FPS (and recorded so)."""
        if fps is not None and num_frames is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        total = metadata.total_num_frames
        fps = fps if fps is not None else self.fps
        if num_frames is None and fps is not None:
            if metadata.fps is None:
                metadata.fps = DEFAULT_FPS
                logger.info("video without an fps: taken as %s frames per second (pass video_metadata)", DEFAULT_FPS)
            num_frames = int(total / metadata.fps * fps)
            num_frames = min(max(num_frames, self.min_frames), self.max_frames, total)
        if num_frames is None:
            num_frames = min(max(total, self.min_frames), self.max_frames)
        return np.linspace(0, total - 1, num_frames).round().astype(int)

    def _target_size(self, num_frames, height, width, size, factor, temporal_factor, cap_pixels_per_frame):
        if not size.shortest_edge or not size.longest_edge:
            raise ValueError(f"`size` dict must contain 'shortest_edge' and 'longest_edge' keys but got {size}.")
        max_pixels = size.longest_edge
        if cap_pixels_per_frame:  # per frame: at most max_video_tokens patches and an even share of the budget
            per_frame = max(min(self.max_video_tokens * factor * factor, size.longest_edge // num_frames),
                            int(size.shortest_edge * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize_video(num_frames, height, width, temporal_factor=temporal_factor, factor=factor,
                                  min_pixels=size.shortest_edge, max_pixels=max_pixels)


# -- which processor, from which config -----------------------------------------------------------------

# transformers' video processor class name -> ours.
VIDEO_PROCESSORS = {"Qwen2VLVideoProcessor": Qwen2VLVideoProcessorPil,
                    "Qwen3VLVideoProcessor": Qwen3VLVideoProcessorPil}
# The video processor each processor class gets when its config names none (transformers' model_type mapping).
_DEFAULT_FOR_PROCESSOR = {"Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
                          "Qwen3VLProcessor": "Qwen3VLVideoProcessor"}


def video_processor_class(processor_class: str, config: dict | None = None):
    """Our video processor class for a transformers processor class name and the video processor config
    found for it (its `video_processor_type`; a legacy image config's `image_processor_type` with
    ImageProcessor read as VideoProcessor, as AutoVideoProcessor reads it); None if there is none."""
    config = config or {}
    named = config.get("video_processor_type")
    if named is None and config.get("image_processor_type"):
        inferred = config["image_processor_type"].replace("ImageProcessor", "VideoProcessor")
        named = inferred if inferred in VIDEO_PROCESSORS else None
    if named is not None:
        name = named.removesuffix("Pil")
        if name not in VIDEO_PROCESSORS:
            raise ValueError(f"video_processor_type {named!r} has no torch-free implementation; "
                             f"expected one of {sorted(VIDEO_PROCESSORS)}")
        return VIDEO_PROCESSORS[name]
    default = _DEFAULT_FOR_PROCESSOR.get(processor_class)
    return VIDEO_PROCESSORS[default] if default else None


def load_video_processor(model_dir, processor_class: str, processor_dict: dict | None = None, **kwargs):
    """The video processor of a saved processor directory, as transformers finds its config
    (processor_config.json's "video_processor", else video_preprocessor_config.json, else
    preprocessor_config.json), or from the processor config's image processor when none of them exists.
    Raises ValueError if neither the config nor `processor_class` names a video processor this module has."""
    try:
        config, _ = VideoProcessorMixin.get_video_processor_dict(model_dir, **kwargs)
    except OSError:
        image_config = (processor_dict or {}).get("image_processor")
        if not isinstance(image_config, dict):
            raise
        config = image_config  # a processor saved without a video processor: transformers' legacy fallback
    cls = video_processor_class(processor_class, config)
    if cls is None:
        raise ValueError(f"{model_dir}: no torch-free video processor for {processor_class}")
    return cls.from_dict(config, **{k: v for k, v in kwargs.items() if k in cls.valid_kwargs.__annotations__})
