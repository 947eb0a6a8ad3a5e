"""A checkpoint's HF processor, loadable without torch or torchvision.

transformers 5's VLM processors take a video processor, and the video processors need torchvision;
the tokenizer and the PIL image processors need neither. Without torchvision we build the processor
class with jaxvlm.video's numpy/PIL video processor in place of transformers' (the Qwen families), or
with images and text only (a processor class jaxvlm.video has no video processor for), so its outputs
(the image- and video-token expansion, Qwen3-VL's frame timestamps, `mm_token_type_ids`, `pixel_values`,
`pixel_values_videos`, Qwen2.5-VL's `second_per_grid_ts`) come from transformers' own processor code.
The class is the one the checkpoint names or, as `AutoProcessor` does, the one registered for
config.json's `model_type` (the family's `INFO.processor_classes`).

A processor class can also be out of reach because its own module imports a torchvision-only module:
transformers' `PixtralProcessor` (llava checkpoints with a Pixtral vision tower, Mistral Small 3.1's
`mistral3`) imports `get_resize_output_image_size` from `image_processing_pixtral`, which imports torch and
torchvision, and the lazy `transformers` module hands out a placeholder for it (the class is marked
`@requires(backends=("torchvision", "torch"))`). The helper is used only by `_get_num_multimodal_tokens`,
and `image_processing_pil_pixtral` (the PIL image processor that transformers' `PixtralImageProcessor`
falls back to) defines the same function. Without torchvision we import `processing_pixtral` with that
module standing in, in `sys.modules`, for the torchvision one for the duration of the import only
(`_TORCHVISION_IMPORTS`), so the processor's code (the `[IMG]` rows with `[IMG_BREAK]` and `[IMG_END]`,
`patch_size * spatial_merge_size`, `image_sizes`) runs unchanged. We chose this over a subclass of
`ProcessorMixin` re-implementing the token layout: it keeps following transformers' code, and if a later
transformers moves the helper or drops the import, the import either just works or fails loudly at
`torch_free_processor` time, never with silently different tokens. A class reached this way is
subclassed under its own name in this module (`_TorchvisionFree<name>`), so that a saved directory names
transformers' class and a pickled processor unpickles in a process that has not imported it yet.
The class keeps transformers' defaults: `PixtralProcessor` returns torch tensors unless told otherwise, so
without torch pass `return_tensors="np"` (as jaxvlm's collator does).
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import sys

import transformers
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin

from jaxvlm.models import model_class
from jaxvlm.video import load_video_processor, video_processor_class

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Hub checkpoints name their processor class in preprocessor_config.json; transformers 5's
# save_pretrained writes processor_config.json instead, with the image processor's config nested in it.
_IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_PROCESSOR_CONFIG_FILES = (*_IMAGE_PROCESSOR_FILES, "tokenizer_config.json")
# Processor classes whose module imports a torchvision-only module for a helper that a torch-free module
# also defines: class name -> (its module, the torchvision-only module, the torch-free stand-in).
_TORCHVISION_IMPORTS = {
    "PixtralProcessor": ("transformers.models.pixtral.processing_pixtral",
                         "transformers.models.pixtral.image_processing_pixtral",
                         "transformers.models.pixtral.image_processing_pil_pixtral"),
}

# transformers' methods that load a processor's sub-processors, which _NumpyVideo overrides: the first from 5.25,
# the second up to 5.24.
_SUBPROCESSOR_LOADERS = ("_resolve_subprocessors", "_get_arguments_from_pretrained")


class _WithoutVideo:
    """Makes a processor class take an image processor and a tokenizer only.

    ProcessorMixin creates, checks, saves and loads exactly the sub-processors `get_attributes()` names,
    so leaving out video_processor here drops it everywhere (the Qwen classes' __init__ passes it on
    positionally, and the mixin zips positional arguments with these names).
    """

    @classmethod
    def get_attributes(cls):
        return [a for a in super().get_attributes() if a != "video_processor"]


class _NumpyVideo:
    """Gives a processor class jaxvlm.video's video processor where transformers would load its own.

    Loading: the tokenizer and the image processor come from transformers' loader, the video processor from
    `jaxvlm.video.load_video_processor`, which reads the config transformers would read. Everything else (the
    call, the chat template, saving, where the video processor's config goes when saved) is the transformers
    class's own. transformers' loader changed in 5.25, so both of its hooks are overridden: up to 5.24
    `_get_arguments_from_pretrained` loads the sub-processors (we run it on the class without its video
    processor and insert ours); from 5.25 `_resolve_subprocessors` does (we run it the same way and add ours).
    """

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        config = dict(processor_dict)  # resolving replaces the sub-processors' configs by the objects
        processor_dict, unused = _image_text_class(cls.__name__)._resolve_subprocessors(
            pretrained_model_name_or_path, processor_dict, **kwargs)
        processor_dict["video_processor"] = load_video_processor(pretrained_model_name_or_path, cls.__name__,
                                                                 config, **kwargs)
        return processor_dict, unused

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        args = _image_text_class(cls.__name__)._get_arguments_from_pretrained(
            pretrained_model_name_or_path, processor_dict, **kwargs)
        video_processor = load_video_processor(pretrained_model_name_or_path, cls.__name__, processor_dict, **kwargs)
        args.insert(cls.get_attributes().index("video_processor"), video_processor)
        return args

    def check_argument_for_proper_class(self, argument_name, argument):
        # transformers looks its video processor base class up by a name it exports only with torchvision.
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"Received a {type(argument).__name__} for argument video_processor, but a "
                                f"VideoProcessorMixin was expected.")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)


def _subclass(name: str, prefix: str, *mixins):
    # save_pretrained records type(processor).__name__ as processor_class: keep transformers' name so that
    # AutoProcessor loads a saved directory. Pickle finds the class by __qualname__ in this module.
    qualname = f"{prefix}{name}"
    subclass = type(name, (*mixins, _transformers_processor_class(name)),
                    {"__qualname__": qualname, "__module__": __name__})
    globals()[qualname] = subclass
    return subclass


@functools.cache
def _image_text_class(name: str):
    return _subclass(name, "_ImageText", _WithoutVideo)


def _import_with_stand_in(module: str, torchvision_module: str, stand_in: str):
    """Imports `module`, whose import of `torchvision_module` gets `stand_in` when torchvision is missing.

    The stand-in is in sys.modules only during the import, so anything else that imports
    `torchvision_module` still gets the ImportError it would get without us.
    """
    if module in sys.modules or is_torchvision_available():
        return importlib.import_module(module)
    saved = sys.modules.get(torchvision_module)
    sys.modules[torchvision_module] = importlib.import_module(stand_in)
    try:
        return importlib.import_module(module)
    finally:
        if saved is None:
            sys.modules.pop(torchvision_module, None)
        else:
            sys.modules[torchvision_module] = saved


@functools.cache
def _transformers_processor_class(name: str):
    if name in _TORCHVISION_IMPORTS:
        cls = getattr(_import_with_stand_in(*_TORCHVISION_IMPORTS[name]), name, None)
    else:
        cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "get_attributes"):
        raise ValueError(f"processor_class {name!r} is not a transformers processor class")
    return cls


@functools.cache
def _torchvision_free_class(name: str):
    """transformers' class `name`, subclassed in this module when its own module needs torchvision."""
    if name in _TORCHVISION_IMPORTS:
        return _subclass(name, "_TorchvisionFree")
    return _transformers_processor_class(name)


@functools.cache
def image_text_processor(name: str):
    """transformers' processor class `name`, without its video processor when it has one."""
    if "video_processor" not in _transformers_processor_class(name).get_attributes():
        return _torchvision_free_class(name)
    return _image_text_class(name)


@functools.cache
def torch_free_processor(name: str):
    """transformers' processor class `name` with jaxvlm.video's video processor in place of transformers'
    (which needs torchvision); without its video processor when jaxvlm.video has none for it; reached
    without torchvision when its module needs it for a helper only (`_TORCHVISION_IMPORTS`: PixtralProcessor)."""
    if "video_processor" not in _transformers_processor_class(name).get_attributes():
        return _torchvision_free_class(name)
    if video_processor_class(name) is None:
        return _image_text_class(name)
    _check_subprocessor_loader()
    return _subclass(name, "_NumpyVideo", _NumpyVideo)


def _check_subprocessor_loader():
    """Raises if this transformers loads sub-processors by a method _NumpyVideo does not override (it would load
    its torchvision video processor and fail with an ImportError that does not say why)."""
    if not any(hasattr(ProcessorMixin, name) for name in _SUBPROCESSOR_LOADERS):
        raise RuntimeError(f"transformers {transformers.__version__}: ProcessorMixin has none of "
                           f"{', '.join(_SUBPROCESSOR_LOADERS)}, which jaxvlm overrides to load a processor's video "
                           f"processor without torchvision. Install torchvision, or transformers 5.19 to 5.25.")


def __getattr__(name: str):
    # A process that unpickles a processor (a dataloader worker) has not built its class yet: build it here.
    for prefix, build in (("_NumpyVideo", torch_free_processor), ("_ImageText", _image_text_class),
                          ("_TorchvisionFree", _torchvision_free_class)):
        base = name[len(prefix):]
        if name.startswith(prefix) and (base in _TORCHVISION_IMPORTS or hasattr(transformers, base)):
            cls = build(base)
            if cls.__qualname__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _named_processor_class(model_dir: str) -> str | None:
    for name in _PROCESSOR_CONFIG_FILES:
        file = os.path.join(model_dir, name)
        if os.path.isfile(file):
            with open(file) as f:
                try:
                    processor_class = json.load(f).get("processor_class")
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}: not valid JSON ({e})") from None
            if processor_class:
                return processor_class
    return None


def _model_type(model_dir: str) -> str | None:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f).get("model_type")


def _family(model_dir: str):
    return model_class(_model_type(model_dir), os.path.join(model_dir, "config.json"))


def load_processor(model_dir: str, family=None):
    """The checkpoint's transformers processor (tokenizer, image processor, chat template) from a local dir.

    With torchvision installed this is `AutoProcessor.from_pretrained(model_dir)`. Without it (torch is not
    needed either) it is the same processor class with the PIL image processor and jaxvlm.video's numpy/PIL
    video processor: called with text, images and videos (frames, arrays or video file paths, the latter
    with PyAV) it returns what the full processor returns, `pixel_values_videos` up to the small difference
    between PIL's and torchvision's resize (see jaxvlm.video).
    `family`: the model class, when the caller knows it (else found from config.json's model_type).
    """
    if not os.path.isdir(model_dir):
        raise NotADirectoryError(f"processor directory {model_dir} does not exist")
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{model_dir} has no tokenizer: expected one of {_TOKENIZER_FILES}")
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in _IMAGE_PROCESSOR_FILES):
        raise FileNotFoundError(f"{model_dir} has no image processor config: expected one of {_IMAGE_PROCESSOR_FILES}")
    named = _named_processor_class(model_dir)
    if family is None and os.path.isfile(os.path.join(model_dir, "config.json")):
        family = _family(model_dir)
    if family is not None:
        expected = {name for _, name in family.INFO.processor_classes}
        if named is not None and named not in expected:
            raise ValueError(f"{model_dir}: processor_class is {named!r}, expected one of {sorted(expected)} "
                             f"for a {'/'.join(family.INFO.model_types)} model")
        name = named or family.INFO.processor_class(_model_type(model_dir))
    elif named is None:
        raise FileNotFoundError(f"{model_dir}: no processor_class in {', '.join(_PROCESSOR_CONFIG_FILES)} and no "
                                f"config.json to find the model family from")
    else:
        name = named
    if is_torchvision_available():
        return transformers.AutoProcessor.from_pretrained(model_dir)
    return torch_free_processor(name).from_pretrained(model_dir)
