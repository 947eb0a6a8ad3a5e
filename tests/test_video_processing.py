"""Video input without torchvision: jaxvlm.video's processors against transformers' own.

This process has no torchvision, so `load_processor` gives the torch-free processor (jaxvlm.video's
video processor inside transformers' Qwen processor class). The reference is transformers' full
processor, with torchvision: it runs in one subprocess per session whose sys.path has torchvision from
<repo>/.test-deps/torchvision (installed there by the `torchvision_dir` fixture, never into the venv).
Both sides run the same case code (RUNNER) on the same inputs; integer outputs and metadata must be
equal, `pixel_values_videos` equal to the frames processed as images by transformers' PIL image processor,
and close to the torchvision reference (PIL's and torchvision's bicubic resizes round differently).
"""
import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from jaxvlm.processing import load_processor
from jaxvlm.tiny import save_tiny_processor
from jaxvlm.video import (DEFAULT_FPS, Qwen2VLVideoProcessorPil, Qwen3VLVideoProcessorPil, VideoMetadata,
                          decode_video, load_video)
from tests.notorch import run_without_torch

REPO = Path(__file__).resolve().parent.parent
TORCHVISION = "torchvision==0.28.0"
TORCHVISION_DIR = REPO / ".test-deps" / "torchvision"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VIDEO_PAD_ID = 291
PIXELS = ("pixel_values", "pixel_values_videos")  # float outputs; everything else must be equal
# |ours - torchvision| over the normalized pixels, measured on these inputs (test_pixel_values_are_close_to_
# torchvision prints it; `pytest -s`): at most 2 uint8 steps after resizing (0.0292 with Qwen2-VL's CLIP std,
# 0.0078 = 1 step with Qwen3-VL's 0.5), mean at most 5e-5. The bounds: 3 steps, and a mean of 1e-4.
MAX_UINT8_STEPS = 3
MEAN_ABS_DIFF = 1e-4

try:
    import av
except ImportError:
    av = None


# The case code both processes run (this process calls it, the subprocesses get its source): builds the
# prompts and calls the processor; files are passed as paths (ours) or decoded with transformers' PyAV
# reader and passed as frames + video_metadata (the reference: transformers decodes files with torchcodec
# only, which is not installed).
def random_image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def video_input(spec, arrays, decode_files):
    kind, key = spec
    if kind == "array":
        return arrays[key], None
    if kind == "pil":
        return [Image.fromarray(frame) for frame in arrays[key]], None
    if not decode_files:
        return key, None
    from transformers.video_utils import load_video
    frames, metadata = load_video(key, backend="pyav")
    return frames, dict(metadata)


def plain(value):
    return np.asarray(value).tolist() if value is not None and not isinstance(value, (str, float, int)) else value


def run_case(processor, case, arrays, decode_files=False):
    videos = [video_input(spec, arrays, decode_files) for spec in case["videos"]]
    images = [random_image(*spec) for spec in case["images"]]
    kwargs = dict(case["kwargs"])
    if decode_files and any(spec[0] == "file" for spec in case["videos"]):
        kwargs["video_metadata"] = [metadata for _, metadata in videos]
    conversations = []
    for items in case["conversations"]:
        content = []
        for kind, value in items:
            if kind == "text":
                content.append({"type": "text", "text": value})
            elif kind == "image":
                content.append({"type": "image", "image": images[value]} if case["chat"] else {"type": "image"})
            else:
                content.append({"type": "video", "video": videos[value][0]} if case["chat"] else {"type": "video"})
        conversations.append([{"role": "user", "content": content}])
    if case["chat"]:
        out = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, add_generation_prompt=True,
                                            return_tensors="np",
                                            processor_kwargs={**kwargs, "padding": True, "return_metadata": True})
    else:
        texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        out = processor(text=texts, images=images or None, videos=[v for v, _ in videos] or None, padding=True,
                        return_tensors="np", return_metadata=True, **kwargs)
    result = {key: np.asarray(value) for key, value in out.items() if key != "video_metadata"}
    result["video_metadata"] = [{key: plain(m[key]) for key in m} for m in out.get("video_metadata", [])]
    return result


RUNNER = "import numpy as np\nfrom PIL import Image\n\n" + "\n\n".join(
    inspect.getsource(f) for f in (random_image, video_input, plain, run_case))

REFERENCE = r'''
import ctypes, glob, os, pickle, sys, types
import torch
# PyPI's torchvision wheel is a CUDA build: with a CPU torch its C++ ops (nms, roi_align, ...) do not load,
# and then the modules registering their meta/autograd kernels fail at import. Video processing uses none of
# those ops (its resize is torch's own antialiased bicubic), so those two modules are left out.
_tv = next(p for p in sys.path if os.path.isfile(os.path.join(p, "torchvision", "__init__.py")))
try:
    ctypes.CDLL(glob.glob(os.path.join(_tv, "torchvision", "_C*.so"))[0])
except OSError:
    for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules[_name] = types.ModuleType(_name)
import json
import numpy as np
import transformers
from transformers import AutoProcessor
from transformers.utils import is_torchvision_available
from transformers.video_utils import VideoMetadata
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
import torchvision
assert is_torchvision_available(), "torchvision is not visible to transformers"

work = sys.argv[1]
with open(os.path.join(work, "cases.json")) as f:
    spec = json.load(f)
arrays = dict(np.load(os.path.join(work, "arrays.npz")))
results = {"torchvision": torchvision.__file__, "cases": {}, "types": {}, "tokens": {}, "sampling": {}}
for family, dirs in spec["dirs"].items():
    for label, model_dir in dirs.items():
        processor = AutoProcessor.from_pretrained(model_dir)
        results["types"][family, label] = (type(processor).__name__, type(processor.video_processor).__name__)
        for case in spec["cases"][family]:
            if label == "saved" and case["name"] != "videos":
                continue
            results["cases"][family, label, case["name"]] = run_case(processor, case, arrays, decode_files=True)
        if label == "tiny":
            sizes = spec["token_sizes"]
            results["tokens"][family] = processor._get_num_multimodal_tokens(video_sizes=sizes)["num_video_tokens"]


def sample(processor, metadata, **kwargs):
    try:
        return np.asarray(processor.sample_frames(VideoMetadata(**metadata), **kwargs)).tolist()
    except (ValueError, ZeroDivisionError, TypeError) as e:
        return type(e).__name__


for name, cls in (("qwen2", Qwen2VLVideoProcessor), ("qwen3", Qwen3VLVideoProcessor)):
    processor = cls(cap_pixels_per_frame=False)
    results["sampling"][name] = [sample(processor, metadata, **kwargs) for metadata, kwargs in spec["sampling"]]
from jaxvlm.processing import load_processor  # with torchvision: transformers' AutoProcessor, unchanged
results["load_processor"] = {family: type(load_processor(dirs["tiny"])).__module__
                             for family, dirs in spec["dirs"].items()}
with open(os.path.join(work, "reference.pkl"), "wb") as f:
    pickle.dump(results, f)
'''

# -- inputs ---------------------------------------------------------------------------------------------


def frames(n, width, height, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


ARRAYS = {"v2": frames(2, 56, 84, 1), "v3": frames(3, 84, 56, 2), "v4": frames(4, 112, 140, 3),
          "v3odd": frames(3, 70, 42, 4), "v30": frames(30, 56, 84, 5)}
# The file's frames: 16-pixel blocks of random colours (random noise does not survive lossy coding).
FILE_FRAMES, FILE_FPS = frames(8, 4, 3, 6).repeat(16, axis=1).repeat(16, axis=2), 4


def cases(family, video_file):
    """The cases for one family: (name, conversations, videos, images, kwargs, chat)."""
    qwen3 = family == "qwen3_vl"
    metadata_30 = [{"total_num_frames": 30, "fps": 10}]
    listed = [
        # Videos of 2, 3 and 4 frames of different sizes (the 4-frame one over the pixel budget), in a batch
        # of two prompts; the 3-frame video given as PIL frames (first: transformers stacks lists of frames
        # only when the first video is one).
        ("videos", [[("video", 0), ("text", "what is this ?"), ("video", 1)], [("video", 2), ("text", "describe it")]],
         [("pil", "v3"), ("array", "v2"), ("array", "v4")], [], {}, False),
        # An image and a video in one prompt (sizes that round half to even).
        ("image_and_video", [[("image", 0), ("video", 0), ("text", "what is in the picture and the video ?")]],
         [("array", "v3odd")], [(56, 84, 7)], {}, False),
        ("text_only", [[("text", "what is this ?")]], [], [], {}, False),
        # 30 frames: Qwen2-VL keeps all (no sampling by default), Qwen3-VL samples at 2 fps of an assumed 24.
        ("thirty_frames", [[("video", 0), ("text", "describe it")]], [("array", "v30")], [], {}, False),
        # Sampling at 2 fps of a 10 fps source, and to a frame count.
        ("sample_fps", [[("video", 0), ("text", "describe it")]], [("array", "v30")], [],
         {"do_sample_frames": True, "fps": 2, "video_metadata": metadata_30}, False),
        ("sample_num_frames", [[("video", 0), ("text", "describe it")]], [("array", "v30")], [],
         {"do_sample_frames": True, "num_frames": 5, **({"fps": None} if qwen3 else {})}, False),
    ]
    if video_file is not None:
        listed += [
            ("file", [[("video", 0), ("text", "what is this ?")]], [("file", video_file)], [], {}, False),
            ("file_chat", [[("video", 0), ("text", "what is this ?")]], [("file", video_file)], [],
             {"do_sample_frames": True, "fps": 2}, True),
            ("frames_chat", [[("image", 0), ("video", 0), ("text", "what is this ?")]], [("pil", "v3")],
             [(56, 84, 7)], {}, True),
        ]
    return [dict(zip(("name", "conversations", "videos", "images", "kwargs", "chat"), case)) for case in listed]


TOKEN_SIZES = [[4, 84, 56], [3, 42, 70], [30, 300, 200]]
SAMPLING = ([({"total_num_frames": total}, {"num_frames": n}) for total in range(1, 41, 3) for n in range(1, 14)]
            + [({"total_num_frames": total, "fps": fps}, {"fps": target}) for total in range(1, 41, 3)
               for fps in (1, 2.5, 10, 24, 29.97) for target in (0.5, 1, 2, 3)]
            + [({"total_num_frames": total}, {}) for total in range(1, 41, 3)])


def write_mp4(path, video, fps):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.bit_rate = 8_000_000
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def torchvision_dir():
    """<repo>/.test-deps/torchvision holding torchvision (installed there when missing; never skipped)."""
    if not (TORCHVISION_DIR / "torchvision-0.28.0.dist-info").is_dir():
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target",
                                 str(TORCHVISION_DIR), TORCHVISION], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"pip install --target {TORCHVISION_DIR} {TORCHVISION} failed:\n"
                        f"{result.stdout}\n{result.stderr}")
    return TORCHVISION_DIR


@pytest.fixture(scope="session")
def session(tmp_path_factory, torchvision_dir):
    """Tiny processors of the three families, our outputs for every case and the reference's."""
    work = tmp_path_factory.mktemp("video")
    video_file = None
    if av is not None:
        video_file = str(work / "clip.mp4")
        write_mp4(video_file, FILE_FRAMES, FILE_FPS)
    dirs, ours, processors = {}, {}, {}
    for family in FAMILIES:
        tiny, saved = str(work / family), str(work / f"{family}-saved")
        save_tiny_processor(tiny, family)
        processors[family] = load_processor(tiny)
        processors[family].save_pretrained(saved)
        dirs[family] = {"tiny": tiny, "saved": saved}
        for case in cases(family, video_file):
            ours[family, case["name"]] = run_case(processors[family], case, ARRAYS)
    np.savez(work / "arrays.npz", **ARRAYS)
    spec = {"dirs": dirs, "cases": {f: cases(f, video_file) for f in FAMILIES}, "token_sizes": TOKEN_SIZES,
            "sampling": SAMPLING}
    (work / "cases.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(torchvision_dir), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", RUNNER + REFERENCE, str(work)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the torchvision reference failed:\n{result.stderr}"
    with open(work / "reference.pkl", "rb") as f:
        reference = pickle.load(f)
    return dict(dirs=dirs, ours=ours, reference=reference, processors=processors, video_file=video_file)


def case_params():
    names = [c["name"] for c in cases("qwen2_vl", "clip.mp4")]
    return [pytest.param(f, n, id=f"{f}-{n}") for f in FAMILIES for n in names]


def ours_and_reference(session, family, name, label="tiny"):
    if (family, name) not in session["ours"]:
        pytest.skip("PyAV (the video extra) is not installed")
    return session["ours"][family, name], session["reference"]["cases"][family, label, name]


# -- against transformers -------------------------------------------------------------------------------


def test_reference_is_transformers_with_side_torchvision(session):
    assert str(TORCHVISION_DIR) in session["reference"]["torchvision"]
    for family in FAMILIES:
        name, video = session["reference"]["types"][family, "tiny"]
        assert name == type(session["processors"][family]).__name__
        assert video == {"qwen3_vl": "Qwen3VLVideoProcessor"}.get(family, "Qwen2VLVideoProcessor")
        # With torchvision, load_processor is AutoProcessor: transformers' own class, from transformers' module.
        assert session["reference"]["load_processor"][family].startswith("transformers.models.")
    import importlib.util
    assert importlib.util.find_spec("torchvision") is None, "torchvision must not be importable in the test venv"


@pytest.mark.parametrize("family, name", case_params())
def test_integer_outputs_and_metadata_equal_transformers(session, family, name):
    ours, ref = ours_and_reference(session, family, name)
    assert set(ours) == set(ref)
    for key in ours:
        if key == "video_metadata":
            assert ours[key] == ref[key]
        elif key not in PIXELS:  # pixels: the tests below
            assert ours[key].dtype == ref[key].dtype, key
            np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    video_tokens = (ours["input_ids"] == VIDEO_PAD_ID).sum()
    np.testing.assert_array_equal(ours["mm_token_type_ids"] == 2, ours["input_ids"] == VIDEO_PAD_ID)
    if "video_grid_thw" in ours:
        assert video_tokens == ours["video_grid_thw"].prod(axis=1).sum() // 4
        assert 0 < video_tokens <= 200
    if family == "qwen2_5_vl" and "video_grid_thw" in ours:
        fps = [m["fps"] or DEFAULT_FPS for m in ours["video_metadata"]]
        if name.startswith("sample_fps"):
            assert ours["second_per_grid_ts"].tolist() == [1.0]  # 6 of 30 frames at 10 fps: 2 fps
        elif name in ("videos", "image_and_video", "thirty_frames"):
            assert ours["second_per_grid_ts"].tolist() == [2 / f for f in fps]


@pytest.mark.parametrize("family, name", case_params())
def test_pixel_values_are_close_to_torchvision(session, family, name):
    ours, ref = ours_and_reference(session, family, name)
    for key in PIXELS:
        if key in ours:
            assert ours[key].dtype == ref[key].dtype == np.float32 and ours[key].shape == ref[key].shape
            diff = np.abs(ours[key] - ref[key])
            processor = session["processors"][family]
            sub = processor.image_processor if key == "pixel_values" else processor.video_processor
            step = 1 / 255 / min(sub.image_std)  # one uint8 step, normalized
            print(f"{family} {name} {key}: |ours - torchvision| max {diff.max():.5f} ({diff.max() / step:.2f} "
                  f"uint8 steps) mean {diff.mean():.2e}")
            assert diff.max() <= MAX_UINT8_STEPS * step + 1e-5 and diff.mean() <= MEAN_ABS_DIFF, key


def frames_as_images(video, grid, video_processor):
    """pixel_values_videos computed from frames `[T, H, W, 3]` one by one as images: PIL bicubic resize to
    the grid's size, then transformers' PIL image processor (one frame per temporal patch), the patches of
    temporal_patch_size consecutive frames (the last frame repeated) put side by side."""
    patch, temporal = video_processor.patch_size, video_processor.temporal_patch_size
    grid_t, grid_h, grid_w = grid
    images = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=video_processor.merge_size, temporal_patch_size=1,
                                      image_mean=list(video_processor.image_mean), do_resize=False,
                                      image_std=list(video_processor.image_std))
    rows = [images(Image.fromarray(frame).resize((grid_w * patch, grid_h * patch), Image.BICUBIC),
                   return_tensors="np")["pixel_values"] for frame in video]
    rows += rows[-1:] * (grid_t * temporal - len(rows))
    rows = np.stack(rows).reshape(grid_t, temporal, grid_h * grid_w, 3, patch * patch)
    return rows.transpose(0, 2, 3, 1, 4).reshape(grid_t * grid_h * grid_w, -1)


@pytest.mark.parametrize("family, name", case_params())
def test_pixel_values_equal_the_frames_processed_as_images(session, family, name):
    ours, _ = ours_and_reference(session, family, name)
    if "pixel_values_videos" not in ours:
        return
    case = next(c for c in cases(family, session["video_file"]) if c["name"] == name)
    expected = []
    for (kind, key), grid, metadata in zip(case["videos"], ours["video_grid_thw"], ours["video_metadata"]):
        video = decode_video(key)[0] if kind == "file" else ARRAYS[key]
        expected.append(frames_as_images(video[metadata["frames_indices"]], grid,
                                         session["processors"][family].video_processor))
    np.testing.assert_array_equal(ours["pixel_values_videos"], np.concatenate(expected))


def test_qwen3_timestamps_follow_the_sampled_frames(session):
    ours, _ = ours_and_reference(session, "qwen3_vl", "file")
    # 8 frames at 4 fps, sampled at 2 fps: frames 0, 2, 5, 7; a timestamp per pair of frames, their mean.
    assert ours["video_metadata"] == [{"total_num_frames": 8, "fps": 4.0, "width": 64, "height": 48,
                                       "duration": 2.0, "video_backend": "pyav", "frames_indices": [0, 2, 5, 7]}]
    processor = session["processors"]["qwen3_vl"]
    metadata = VideoMetadata(**ours["video_metadata"][0])
    text = processor.replace_video_token({"video_grid_thw": ours["video_grid_thw"], "video_metadata": [metadata]}, 0)
    assert text.startswith("<0.2 seconds><|vision_start|>") and "<1.5 seconds><|vision_start|>" in text


def test_token_counts_and_frame_sampling_equal_transformers(session):
    for family in FAMILIES:
        tokens = session["processors"][family]._get_num_multimodal_tokens(video_sizes=TOKEN_SIZES)["num_video_tokens"]
        assert tokens == session["reference"]["tokens"][family], family
    for name, cls in (("qwen2", Qwen2VLVideoProcessorPil), ("qwen3", Qwen3VLVideoProcessorPil)):
        processor = cls(cap_pixels_per_frame=False)
        for (metadata, kwargs), expected in zip(SAMPLING, session["reference"]["sampling"][name]):
            try:
                got = processor.sample_frames(VideoMetadata(**metadata), **kwargs).tolist()
            except (ValueError, ZeroDivisionError) as e:
                got = type(e).__name__
            if expected == "TypeError":
                # transformers' Qwen2-VL sampling with neither fps nor num_frames compares None with an int;
                # ours keeps every frame (what that code path means to do).
                assert (name, kwargs) == ("qwen2", {}) and got == list(range(metadata["total_num_frames"]))
            else:
                assert got == expected, (name, metadata, kwargs)


# -- saving and loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_processor_loads_here_and_in_transformers(session, family):
    saved = session["dirs"][family]["saved"]
    with open(os.path.join(saved, "processor_config.json")) as f:
        video_config = json.load(f)["video_processor"]
    assert video_config["video_processor_type"] == session["reference"]["types"][family, "tiny"][1]
    reloaded = load_processor(saved)
    assert type(reloaded) is type(session["processors"][family])
    case = cases(family, None)[0]
    again = run_case(reloaded, case, ARRAYS)
    ours = session["ours"][family, case["name"]]
    for key in ours:
        if key == "video_metadata":
            assert again[key] == ours[key]
        else:
            np.testing.assert_array_equal(again[key], ours[key], err_msg=key)
    # transformers (with torchvision) loads our saved directory and gives what it gives for the original.
    ref_saved = session["reference"]["cases"][family, "saved", case["name"]]
    ref_tiny = session["reference"]["cases"][family, "tiny", case["name"]]
    for key in ref_tiny:
        if key == "video_metadata":
            assert ref_saved[key] == ref_tiny[key]
        else:
            np.testing.assert_array_equal(ref_saved[key], ref_tiny[key], err_msg=key)
    clone = pickle.loads(pickle.dumps(reloaded))
    np.testing.assert_array_equal(run_case(clone, case, ARRAYS)["pixel_values_videos"], ours["pixel_values_videos"])


# -- frames, files, no torch ----------------------------------------------------------------------------


def test_load_video_from_frames_and_file(session):
    video, metadata = load_video([Image.fromarray(f) for f in ARRAYS["v3"]])
    np.testing.assert_array_equal(video, ARRAYS["v3"])
    assert (metadata.total_num_frames, metadata.fps, metadata.frames_indices) == (3, None, [0, 1, 2])
    assert (metadata.height, metadata.width) == (56, 84)
    video, metadata = load_video(ARRAYS["v30"], fps=10)
    assert video is ARRAYS["v30"] and (metadata.fps, metadata.duration) == (10, 3.0)
    if av is None:
        pytest.skip("PyAV (the video extra) is not installed")
    video, metadata = load_video(session["video_file"])
    assert video.shape == (8, 48, 64, 3) and video.dtype == np.uint8
    assert (metadata.total_num_frames, metadata.fps, metadata.duration) == (8, 4.0, 2.0)
    assert np.abs(video.astype(int) - FILE_FRAMES).mean() < 8  # lossy coding: nearly the frames written


def test_file_without_pyav_names_the_extra(monkeypatch, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"jaxvlm\[video\]"):
        load_video(str(path))


def test_works_without_torch(session, tmp_path):
    """The qwen3_vl cases (files too) with torch and torchvision hidden, loaded from the directory and from
    a processor pickled here (a fresh process builds the processor class when unpickling)."""
    model_dir = session["dirs"]["qwen3_vl"]["tiny"]
    (tmp_path / "processor.pkl").write_bytes(pickle.dumps(session["processors"]["qwen3_vl"]))
    code = f"""
import json, pickle, sys
import numpy as np
{RUNNER}
from jaxvlm.processing import load_processor
arrays = dict(np.load({str(Path(model_dir).parent / "arrays.npz")!r}))
with open({str(tmp_path / "processor.pkl")!r}, "rb") as f:
    processors = {{"loaded": load_processor({model_dir!r}), "unpickled": pickle.load(f)}}
out = {{}}
for label, processor in processors.items():
    for case in {cases("qwen3_vl", session["video_file"])!r}:
        result = run_case(processor, case, arrays)
        out[label + " " + case["name"]] = {{"input_ids": result["input_ids"].tolist(),
                                           "video_grid_thw": result.get("video_grid_thw", np.zeros(0)).tolist()}}
print(json.dumps({{"cases": out, "torch": "torch" in sys.modules, "torchvision": "torchvision" in sys.modules,
                  "video_processor": type(processors["loaded"].video_processor).__name__}}))
"""
    result = json.loads(run_without_torch(code, timeout=180).strip().splitlines()[-1])
    assert not result["torch"] and not result["torchvision"]
    assert result["video_processor"] == "Qwen3VLVideoProcessorPil"
    assert len(result["cases"]) == 2 * len(cases("qwen3_vl", session["video_file"]))
    for label_name, got in result["cases"].items():
        ref = session["reference"]["cases"]["qwen3_vl", "tiny", label_name.split()[1]]
        assert got["input_ids"] == ref["input_ids"].tolist(), label_name
        assert got["video_grid_thw"] == ref.get("video_grid_thw", np.zeros(0)).tolist(), label_name
