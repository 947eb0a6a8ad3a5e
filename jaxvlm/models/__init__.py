"""The model families jaxvlm can import, by HF `model_type`."""
from jaxvlm.models import qwen2_vl

FAMILIES = {model_type: qwen2_vl for model_type in qwen2_vl.MODEL_TYPES}


def family_for(model_type: str, where: str):
    """The module implementing `model_type`, or a ValueError listing the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
