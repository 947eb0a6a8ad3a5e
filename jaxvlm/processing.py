"""The HF processor of a Qwen2-VL / Qwen2.5-VL checkpoint, loadable without torch or torchvision.

transformers 5's Qwen processors insist on a video processor, and the Qwen video processor needs
torchvision; the tokenizer and the PIL image processor need neither. Without torchvision we build the
family's processor class with images and text only, so its outputs (the `<|image_pad|>` expansion,
`mm_token_type_ids`, `pixel_values`) come from transformers' own code.
"""
from __future__ import annotations

import json
import os

from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.utils import is_torchvision_available

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Hub checkpoints name their processor class in preprocessor_config.json; transformers 5's
# save_pretrained writes processor_config.json instead, with the image processor's config nested in it.
_PROCESSOR_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")


class _WithoutVideo:
    """Makes a Qwen processor class take an image processor and a tokenizer only.

    ProcessorMixin creates, checks, saves and loads exactly the sub-processors `get_attributes()` names,
    so leaving out video_processor here drops it everywhere (the Qwen classes' __init__ passes it on
    positionally, and the mixin zips positional arguments with these names).
    """

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


class _Qwen2VLImageTextProcessor(_WithoutVideo, Qwen2VLProcessor):
    pass


class _Qwen2_5_VLImageTextProcessor(_WithoutVideo, Qwen2_5_VLProcessor):
    pass


# save_pretrained records type(processor).__name__ as processor_class: keep the transformers names so
# that AutoProcessor loads a saved dir. Pickle finds the classes by __qualname__, which stays.
_Qwen2VLImageTextProcessor.__name__ = Qwen2VLProcessor.__name__
_Qwen2_5_VLImageTextProcessor.__name__ = Qwen2_5_VLProcessor.__name__
_IMAGE_TEXT_PROCESSORS = {cls.__name__: cls for cls in (_Qwen2VLImageTextProcessor, _Qwen2_5_VLImageTextProcessor)}


def _processor_class_name(model_dir: str) -> str:
    for name in _PROCESSOR_CONFIG_FILES:
        file = os.path.join(model_dir, name)
        if os.path.isfile(file):
            with open(file) as f:
                processor_class = json.load(f).get("processor_class")
            if processor_class in _IMAGE_TEXT_PROCESSORS:
                return processor_class
            raise ValueError(f"{file}: processor_class is {processor_class!r}, expected one of "
                             f"{sorted(_IMAGE_TEXT_PROCESSORS)}")
    raise FileNotFoundError(f"{model_dir} has no image processor config: expected one of {_PROCESSOR_CONFIG_FILES}")


def load_processor(model_dir: str):
    """The checkpoint's transformers processor (tokenizer, image processor, chat template) from a local dir.

    With torchvision installed this is `AutoProcessor.from_pretrained(model_dir)`. Without it (torch is not
    needed either) it is the family's processor class (Qwen2VLProcessor / Qwen2_5_VLProcessor) with the
    PIL image processor and no video processor: called with text and images it returns the same
    input_ids, attention_mask, mm_token_type_ids, pixel_values [patches, 3*2*14*14] and
    image_grid_thw [images, 3] as the full processor; videos are not supported.
    """
    if not os.path.isdir(model_dir):
        raise NotADirectoryError(f"processor directory {model_dir} does not exist")
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{model_dir} has no tokenizer: expected one of {_TOKENIZER_FILES}")
    processor_class_name = _processor_class_name(model_dir)
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(model_dir)
    return _IMAGE_TEXT_PROCESSORS[processor_class_name].from_pretrained(model_dir)
