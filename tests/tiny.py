"""Tiny random-weight transformers models (torch) for parity tests; the offline pieces live in jaxvlm.tiny."""
import torch

from jaxvlm.models.qwen2_vl import Qwen2VLForConditionalGeneration
from jaxvlm.tiny import VOCAB, save_tiny_processor, tiny_config  # noqa: F401 (re-exported to the tests)

_QWEN_TOKENS = Qwen2VLForConditionalGeneration.TINY.special_tokens
IMAGE_TOKEN_ID = _QWEN_TOKENS["<|image_pad|>"]
VIDEO_TOKEN_ID = _QWEN_TOKENS["<|video_pad|>"]
VISION_START_ID = _QWEN_TOKENS["<|vision_start|>"]
VISION_END_ID = _QWEN_TOKENS["<|vision_end|>"]


def build_hf_model(family, seed=0, **text_overrides):
    """A random-weight transformers model of the family, fp32, eval mode."""
    from transformers import AutoModelForImageTextToText
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(family, **text_overrides), dtype=torch.float32)
    # transformers' init leaves norms at 1 and biases at 0; randomise them so the parity test sees them.
    # Its small init also makes attention nearly uniform, which would hide position (rotary) errors:
    # larger query/key weights make attention depend on positions, as in a trained model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv.weight")):
                p.mul_(8.0)
            if p.ndim >= 2 and not p.any():  # a weight initialised to zero (Gemma 3's mm_input_projection_weight),
                p.normal_(0.0, p.shape[0] ** -0.5)  # which would hide everything before it
    return model.eval()


def with_hf_weights(module, hf_model, key_map):
    """`module` (an nnx module) holding `hf_model`'s weights: `key_map` ({transformers' state_dict key: (our param
    path, row or None)}, a tower's `hf_key_map`) must name every tensor of the state dict, and every param must
    get its value (a stack of zero rows keeps its empty one)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    state_dict = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    assert set(key_map) == set(state_dict), set(key_map) ^ set(state_dict)
    rows = {}
    for key, (path, row) in key_map.items():
        rows.setdefault(path, {})[row] = state_dict[key]
    arrays = {path: r[None] if None in r else np.stack([r[i] for i in range(len(r))]) for path, r in rows.items()}
    graphdef, state = nnx.split(module)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Param):
            key = ".".join(map(str, path))
            value = arrays.pop(key, None)
            if value is None:  # a stack of zero layers
                assert var.get_value().size == 0, key
                value = var.get_value()
            assert value.shape == var.get_value().shape, (key, value.shape, var.get_value().shape)
            var = var.replace(jnp.asarray(value))
        flat.append((path, var))
    assert not arrays, sorted(arrays)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
