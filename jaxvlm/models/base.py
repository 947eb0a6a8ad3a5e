"""What every model family's top module offers besides its forward: Unsloth's methods on the model."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


class VLM(nnx.Module):
    """Base of a family's top module, which defines `prepare_inputs(**processor_outputs)` and
    `forward(inputs) -> logits`. Attributes set by from_pretrained: model_dir, name_or_path,
    max_seq_length."""

    def __call__(self, **processor_outputs: Any) -> jax.Array:
        """Logits for what the processor returned (input_ids, attention_mask, pixel_values, image_grid_thw...)."""
        return _jit_forward(self, self.prepare_inputs(**processor_outputs))

    def generate(self, **kwargs) -> np.ndarray:
        """Prompt + generated ids; see `jaxvlm.generate.generate` for the arguments."""
        from jaxvlm.generate import generate
        kwargs.setdefault("max_seq_length", getattr(self, "max_seq_length", None))
        return generate(self, **kwargs)

    def save_pretrained(self, save_directory: str, tokenizer=None, overwrite: bool = False, **kwargs) -> None:
        """Writes the LoRA adapter as a PEFT adapter directory (plus the processor, if given), as
        Unsloth's `model.save_pretrained` does after get_peft_model."""
        self.save_pretrained_merged(save_directory, tokenizer, save_method="lora", overwrite=overwrite)

    def print_trainable_parameters(self) -> None:
        from jaxvlm.lora import print_trainable_parameters
        print_trainable_parameters(self)

    def save_pretrained_merged(self, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                               **kwargs) -> None:
        """See `jaxvlm.export.save_pretrained_merged`."""
        from jaxvlm.export import save_pretrained_merged
        save_pretrained_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)

    def push_to_hub_merged(self, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", **kwargs) -> str:
        """See `jaxvlm.export.push_to_hub_merged`."""
        from jaxvlm.export import push_to_hub_merged
        return push_to_hub_merged(self, repo_id, tokenizer, save_method=save_method, **kwargs)


_jit_forward = nnx.jit(lambda model, inputs: model.forward(inputs))
