"""jaxvlm: fine-tune vision-language models in JAX/Flax with Unsloth's FastVisionModel API."""
from jaxvlm.fast_vision_model import FastModel, FastVisionModel

__all__ = ["FastModel", "FastVisionModel"]
