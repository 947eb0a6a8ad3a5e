"""The family seam: what a model family provides, as a base class with its facts on the class.

A family is one file under jaxvlm/models/ with a `VisionLanguageModel` subclass plus one registry line
in jaxvlm/models/__init__.py (../shared/FAMILY.md lists the parts). Nothing outside the family asks
which family it holds: the importer, LoRA, quantization, export, the collator, the processor loader,
`jaxvlm.tiny` and generation read `type(model).INFO` or call the methods below.

Parts of ../shared/FAMILY.md and where they live:
  config                       `config_from_hf` (a frozen dataclass from the transformers config)
  modules                      the subclass's attributes, paths mirroring transformers' module paths
  HF key map, current and old  `INFO.stacked` (`stacks()`), `INFO.legacy_keys`, `INFO.export_keys`,
                               `INFO.ignored_keys`, `INFO.transposed_keys`
  input preparation            `prepare_inputs` (host side, numpy) -> the arrays `forward` takes
  LoRA target names            the Linear modules' per-layer HF names (jaxvlm.targets applies Unsloth's
                               `get_peft_regex` to them, as Unsloth does to the torch model's names)
  modules kept 16-bit in 4-bit `INFO.quant_skip`
  chat / collator specifics    `INFO.processor_classes`, `INFO.vision_tokens`, `INFO.instruction_part`,
                               `INFO.response_part`, `pixel_row_shape`, `PIXEL_BUCKET_MIN`,
                               `INFO.sample_arrays`
  generation cache layout      `init_cache`, `prefill`, `decode`, `next_positions`, `INFO.prompt_sized_cache`
  tiny offline models          `tiny_config`, `TINY` (jaxvlm.tiny writes them)
  dtypes it cannot run in      `resolve_dtype`
  placement on a device mesh   `sharding_rules` (jaxvlm.sharding), `PER_SHARD_INPUTS`, `input_fill`
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ConfigError(ValueError):
    """A config.json field that a family does not understand."""


@dataclasses.dataclass(frozen=True)
class FamilyInfo:
    """A family's facts that the layers above its network need."""

    model_types: tuple[str, ...]  # config.json `model_type`s this class implements
    # Prefixes of the stacked blocks (HF module paths; see jaxvlm.paths).
    stacked: tuple[str, ...]
    # (regex, replacement) from the older on-disk key names to transformers' current in-memory names.
    legacy_keys: tuple[tuple[str, str], ...]
    # (regex, replacement) from current names to the names merged exports write.
    export_keys: tuple[tuple[str, str], ...]
    # On-disk tensors that have no param here (regexes), e.g. rotary inverse frequencies.
    ignored_keys: tuple[str, ...]
    # Module names (a component of the path) whose Linear weights stay 16-bit in 4-bit / 8-bit mode.
    quant_skip: tuple[str, ...]
    # (model_type, transformers processor class name) pairs: the classes a checkpoint of that type may name; the
    # first of a model_type is used for checkpoints that name none.
    processor_classes: tuple[tuple[str, str], ...]
    # Chat-template tokens standing for images or videos: the loss never targets them.
    vision_tokens: tuple[str, ...]
    # The chat markers that open a user turn and an assistant turn (train_on_responses_only defaults).
    instruction_part: str
    response_part: str
    # Tensors (regexes on current key names) that checkpoints may hold with their last two axes swapped, e.g.
    # Qwen3-VL-MoE's experts, [experts, in, out] on the hub and [experts, out, in] in memory. The importer
    # takes either layout, by shape (as transformers' Transpose(check_dims=True) does); exports write the
    # in-memory layout, which is what transformers 5's save_pretrained writes.
    transposed_keys: tuple[str, ...] = ()
    # Processor outputs that stay one row per sample in a batch, as (name, the names of the axes that follow the
    # batch axis, as far as they are padded): "seq" (the token axis) or "images" (the sample's images); later axes
    # are equal across samples. E.g. Llama 3.2 Vision's pixel_values [batch, images, tiles, 3, size, size]:
    # ("images",), cross_attention_mask [batch, seq, images, tiles]: ("seq", "images"). The collator stacks them
    # (and then asks for no `pixel_row_shape`); empty: pixel_values rows are concatenated over the batch.
    sample_arrays: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Whether `init_cache` leaves have axes that a prompt sizes (Llama 3.2 Vision's cross-attention keys and values:
    # [layers, batch, the prompt's vision tokens, ...], 0 for a text prompt), all-zero entries there meaning absent
    # (masked out, adding nothing). The engine then zero-pads such rows to its slot cache, or grows the slot cache.
    prompt_sized_cache: bool = False

    def processor_class(self, model_type: str) -> str:
        return next(name for kind, name in self.processor_classes if kind == model_type)


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """What `jaxvlm.tiny` needs to write a tiny offline checkpoint of the family (no hub, no torch)."""

    special_tokens: dict[str, int]  # token -> id, inside the tiny vocabulary
    pad_token: str
    eos_token: str
    chat_template: str
    image_processor: dict  # preprocessor_config.json, less processor_class
    # video_preprocessor_config.json, less processor_class; None: the family writes none (a video
    # processor then reads preprocessor_config.json, as transformers' does).
    video_processor: dict | None = None
    bos_token: str | None = None
    # The tokenizer's named extra tokens that the processor reads (Gemma 3's boi_token, image_token, ...).
    extra_special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    # processor_config.json's processor arguments (e.g. image_seq_length), less processor_class; None: none.
    processor: dict | None = None


class VisionLanguageModel(nnx.Module):
    """Base of a family's top module. Subclasses set `INFO`, `TINY`, implement the methods that raise
    NotImplementedError here, and build their modules in `__init__(cfg, dtype)` after calling
    `super().__init__(cfg, dtype)`.

    Attributes: `config` (the family's config dataclass), `dtype` (compute and 16-bit storage dtype,
    also the dtype of merged exports). from_pretrained adds model_dir, name_or_path, max_seq_length.
    """

    INFO: ClassVar[FamilyInfo]
    TINY: ClassVar[TinySpec]
    # The collator pads pixel_values along its first axis (patches, or whole images) to a bucket ladder
    # (64, 96, 128, ...) that starts here.
    PIXEL_BUCKET_MIN: ClassVar[int] = 64
    # Whether the trainer may give each data-parallel shard of a device mesh a batch of its own, stacked on a leading
    # axis (jaxvlm.train.trainer.SFTTrainer.per_shard): true when `prepare_inputs` of batches that the collator
    # padded to one sequence length and one count of pixel_values rows differ in shape only in arrays that
    # `input_fill` pads. Then each device's vision tower sees its own samples' images only.
    PER_SHARD_INPUTS: ClassVar[bool] = False

    def __init__(self, cfg, dtype):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def config_from_hf(cls, hf_config) -> Any:
        """The family's frozen config dataclass from a transformers config object; ValueError naming
        the config.json field this code does not understand."""
        raise NotImplementedError

    @classmethod
    def resolve_dtype(cls, dtype):
        """The compute dtype to use when the user asks for `dtype` (a family whose numerics do not hold in it
        warns and says which it takes instead)."""
        return dtype

    @classmethod
    def tiny_config(cls, model_type: str, size: str = "test", **text_overrides):
        """A transformers config of a tiny model ("test": for tests, "demo": a little larger) that uses
        every behaviour switch the real checkpoints use; `text_overrides` go to its text config."""
        raise NotImplementedError

    # -- the forward ----------------------------------------------------------------------------

    def prepare_inputs(self, **processor_outputs) -> dict[str, np.ndarray]:
        """The arrays `forward` takes, computed on the host from what the processor returns (the names
        transformers' forward takes for this family). `n_pad_patches` (the collator's bucket padding)
        is accepted as well."""
        raise NotImplementedError

    def stacks(self) -> tuple:
        """The stacked blocks (jaxvlm.paths): `INFO.stacked` (row r = transformers' layer r), unless the family's
        config numbers a stack's rows otherwise (then `paths.Stack`s)."""
        return type(self).INFO.stacked

    def pixel_row_shape(self, image_processor) -> tuple[int, ...]:
        """The shape of one row of the processor's pixel_values (the collator pads with such rows): by default a
        flattened patch of `temporal_patch_size` frames, as the Qwen processors give them."""
        return (3 * image_processor.temporal_patch_size * image_processor.patch_size ** 2,)

    def sharding_rules(self) -> tuple[tuple[str, tuple], ...]:
        """(regex on a param path, the PartitionSpec entries of its axes after the stacked layer axes) pairs that
        place the family's weights on a device mesh before jaxvlm.sharding's generic rule; first match wins. None
        by default: the generic rule (FSDP on each weight's largest divisible axis, tensor-parallel by Linear
        name) fits the families so far."""
        return ()

    def sample_padding(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """What the collator fills `INFO.sample_arrays`' array `name` with before it writes the samples' own
        values: the value of padding images and of samples without images (the processor's, for a batch it pads).
        Zeros by default."""
        return np.zeros(shape, dtype)

    def input_fill(self, name: str, inputs: dict[str, np.ndarray]):
        """The value that pads `prepare_inputs`' array `name` (in `inputs`, one data-parallel shard's arrays) at the
        end of its axes, so that every shard's batch has one shape (the trainer stacks them: `PER_SHARD_INPUTS`);
        it must leave the result unchanged. None (the default): the array takes no padding (its shape is decided by
        the collator's sizes alone)."""
        return None

    def hidden_states(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """Final hidden states `[batch, seq, hidden]`; jit-compatible."""
        raise NotImplementedError

    def logits(self, h: jax.Array) -> jax.Array:
        """Vocabulary logits `[..., vocab]` from final hidden states, in the compute dtype."""
        raise NotImplementedError

    def forward(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """Logits `[batch, seq, vocab]` from `prepare_inputs` arrays; jit-compatible."""
        return self.logits(self.hidden_states(inputs))

    def __call__(self, **processor_outputs: Any) -> jax.Array:
        """Logits for what the processor returned (input_ids, attention_mask, pixel_values, ...)."""
        return _jit_forward(self, self.prepare_inputs(**processor_outputs))

    # -- generation (jaxvlm.generate talks to a family only through these) ----------------------

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model was trained for (config's max_position_embeddings), if known."""
        return None

    def init_cache(self, batch: int, length: int) -> Any:
        """An empty cache pytree for `length` token slots (what `prefill` and `decode` read and write)."""
        raise NotImplementedError

    def prefill(self, inputs: dict[str, jax.Array], cache, key_mask: jax.Array) -> tuple[jax.Array, Any]:
        """(hidden `[batch, prompt_len, hidden]`, cache) for the prompt, written to slots 0..prompt_len-1.
        `key_mask [batch, cache_len]` marks the slots that hold (or will hold) real tokens."""
        raise NotImplementedError

    def decode(self, tokens: jax.Array, positions: jax.Array, cache, key_mask: jax.Array,
               index) -> tuple[jax.Array, Any]:
        """(hidden `[batch, 1, hidden]`, cache) after feeding `tokens [batch]` at cache slot `index`,
        each at text position `positions [batch]` (counted as `next_positions` counts). `index`: a scalar, the same
        slot for every row (generate), or int32 `[batch]`, each row's own slot (the engine's slot cache,
        jaxvlm.engine); `layers.write_step` and `layers.query_slots` take both."""
        raise NotImplementedError

    def next_positions(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """int32 `[batch]`: the position of the first generated token of each prompt."""
        raise NotImplementedError


_jit_forward = nnx.jit(lambda model, inputs: model.forward(inputs))
