"""`FastVisionModel` (= `FastModel`): Unsloth's entry points, for JAX, and the model object users hold.

from_pretrained is the one place where config.json's `model_type` becomes a family class (the registry
in jaxvlm.models). The model it returns is that family's network with Unsloth's methods added
(`UserMethods`: generate, save_pretrained, save_pretrained_merged, push_to_hub_merged, ...), so the
families below never import generation, LoRA or export.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm import export, lora
from jaxvlm.converters.hf_import import load_state, quantizing_convert
from jaxvlm.converters.peft_adapter import load_adapter
from jaxvlm.converters.safetensors_io import Checkpoint
from jaxvlm.generate import generate
from jaxvlm.layers import REMAT_POLICIES
from jaxvlm.models import model_class
from jaxvlm.quantize import quantized_weight_keys
from jaxvlm.sharding import as_mesh

# The processor each loaded model came with, so that for_training / for_inference can set its padding side.
_PROCESSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def resolve_model_dir(model_name: str, token=None, revision=None) -> str:
    """A local directory holding the model: `model_name` itself, or its hub snapshot.

    Hub downloads go through huggingface_hub, so HF_HUB_OFFLINE=1 serves only what is cached.
    """
    if os.path.isdir(model_name):
        return model_name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        return snapshot_download(model_name, revision=revision, token=token, allow_patterns=_HUB_FILES)
    except HFValidationError:
        raise FileNotFoundError(f"{model_name!r} is neither a local directory nor a hub model id") from None
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{model_name!r}: not a local directory, and the hub is unreachable or offline (HF_HUB_OFFLINE) "
            f"with no cached copy: {e}") from None


def read_config(model_dir: str):
    """(family class, transformers config) of `model_dir`'s config.json (flat or nested, old or new names)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing; expected an HF model directory")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    family = model_class(raw.get("model_type"), path)
    from transformers import AutoConfig
    return family, AutoConfig.from_pretrained(model_dir)


_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(dtype) -> jnp.dtype:
    """The compute dtype for what users pass as `dtype`: None (bfloat16), a jnp / numpy dtype or type
    (jnp.float32, np.float16), a string ("float32", "bfloat16", "float16", "torch.bfloat16"), or a torch
    dtype. ValueError for anything else, integer and 8-bit types included."""
    if dtype is None:
        return jnp.dtype(jnp.bfloat16)
    if isinstance(dtype, str) or type(dtype).__module__ == "torch":
        dtype = str(dtype).removeprefix("torch.")  # torch.bfloat16 prints as "torch.bfloat16"
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in _FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected None, float32, bfloat16 or float16 (a jnp / numpy / "
                         f"torch dtype or its name); quantized storage is chosen with load_in_4bit / "
                         f"load_in_8bit, not dtype")
    return resolved


class UserMethods:
    """Unsloth's methods on the model object (mixed into the family's class by from_pretrained)."""

    def generate(self, **kwargs) -> np.ndarray:
        """Prompt + generated ids; see `jaxvlm.generate.generate` for the arguments."""
        kwargs.setdefault("max_seq_length", getattr(self, "max_seq_length", None))
        return generate(self, **kwargs)

    def fast_generate(self, prompts, sampling_params=None, lora_request=None, **kwargs):
        """vLLM's `generate` (what Unsloth's `fast_generate` calls with `fast_inference=True`) on jaxvlm's batched
        engine: continuous batching over a slot KV cache. See `jaxvlm.engine.fast_generate`."""
        from jaxvlm.engine import fast_generate
        processor = _PROCESSORS.get(self)
        if processor is None:
            raise ValueError("fast_generate: this model has no processor (load it with FastVisionModel."
                             "from_pretrained), or call jaxvlm.engine.fast_generate(model, processor, ...)")
        kwargs.setdefault("max_num_seqs", getattr(self, "max_num_seqs", 64))
        return fast_generate(self, processor, prompts, sampling_params, lora_request=lora_request, **kwargs)

    def load_lora(self, adapter_dir: str):
        """Unsloth's `model.load_lora(path)` for `fast_generate(..., lora_request=...)`: this model with the PEFT
        adapter in `adapter_dir` (see `load_adapter`)."""
        return self.load_adapter(adapter_dir)

    def save_pretrained(self, save_directory: str, tokenizer=None, **kwargs) -> None:
        """Writes the LoRA adapter as a PEFT adapter directory (plus the processor, if given), as
        Unsloth's `model.save_pretrained` does after get_peft_model."""
        export.save_pretrained_merged(self, save_directory, tokenizer, save_method="lora")

    def save_pretrained_merged(self, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                               **kwargs) -> None:
        """See `jaxvlm.export.save_pretrained_merged`."""
        export.save_pretrained_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)

    def push_to_hub_merged(self, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", **kwargs) -> str:
        """See `jaxvlm.export.push_to_hub_merged`."""
        return export.push_to_hub_merged(self, repo_id, tokenizer, save_method=save_method, **kwargs)

    def load_adapter(self, adapter_dir: str):
        """This (base) model with the PEFT adapter in `adapter_dir` applied; returns the new model."""
        return load_adapter(self, adapter_dir)

    def print_trainable_parameters(self) -> None:
        lora.print_trainable_parameters(self)


@functools.cache
def user_class(family):
    """The family's model class with `UserMethods` (one class per family, so NNX graphs stay stable)."""
    return type(family.__name__, (UserMethods, family), {"__module__": family.__module__,
                                                         "__qualname__": family.__qualname__})


class FastVisionModel:
    """Load a VLM, add LoRA, switch between training and inference: Unsloth's API over Flax NNX."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int = 2048,
        dtype=None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        load_in_16bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        trust_remote_code: bool = False,
        use_gradient_checkpointing="unsloth",
        revision: str | None = None,
        mesh=None,
        fast_inference: bool = False,
        max_num_seqs: int = 64,
        **kwargs,
    ):
        """Import an HF checkpoint (local dir or hub id). Returns `(model, processor)`.

        `dtype` is the compute and 16-bit storage dtype (default bfloat16). The frozen base is stored
        in NF4 with `load_in_4bit` (the default, as in Unsloth), int8 with `load_in_8bit`, or in
        `dtype` with `load_in_16bit` / `full_finetuning`, which take precedence.

        `mesh` ("fsdp=4,tensor=2", a dict of axis sizes or a jax Mesh; see `jaxvlm.sharding.make_mesh`) loads
        every param straight into its shards on that mesh, as `jaxvlm.sharding.shard_model` would place it, each
        device's share read from the files alone: for a model that does not fit one device. None: one device.

        `fast_inference` (Unsloth's flag; there it loads vLLM): `model.fast_generate(prompts, sampling_params)` runs
        on jaxvlm's batched engine (jaxvlm.engine) with `max_num_seqs` slots of `max_seq_length` tokens. The engine
        needs no separate load, so `fast_generate` works without the flag too; vLLM's memory arguments
        (gpu_memory_utilization, ...) are accepted and ignored.
        """
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit cannot both be True")
        sixteen = load_in_16bit or full_finetuning
        quant = None if sixteen else "nf4" if load_in_4bit else "int8" if load_in_8bit else None
        dtype = compute_dtype(dtype)
        mesh = None if mesh is None else as_mesh(mesh)

        model_dir = resolve_model_dir(model_name, token=token, revision=revision)
        # Beside the main thread's config and weights: the backend's start (CUDA's context: 0.6 s on an H200) and the
        # processor (transformers' processing modules import in seconds; with torch installed, torch's import too).
        # transformers is imported by this thread first: its lazy module is not safe to import from two threads at once.
        _LOADER.submit(jax.devices)
        family, hf_config = read_config(model_dir)
        processor = _LOADER.submit(_load_processor, model_dir, family)
        cls, info = user_class(family), family.INFO
        cfg = family.config_from_hf(hf_config)
        dtype = jnp.dtype(family.resolve_dtype(dtype))
        prequantized = _check_quantization_config(hf_config, model_dir)
        ckpt = Checkpoint(model_dir)
        abstract = nnx.eval_shape(lambda: cls(cfg, dtype))
        ignored = info.ignored_keys + ((r"^lm_head\.",) if getattr(cfg, "tie_word_embeddings", False) else ())
        targets = quantized_weight_keys(abstract, info.quant_skip) if quant else set()
        model = load_state(abstract, ckpt, stacked=abstract.stacks(), renames=info.legacy_keys, ignored=ignored,
                           convert=quantizing_convert(quant, targets, dtype, prequantized), mesh=mesh)
        model.max_seq_length = max_seq_length
        model.name_or_path = model_name
        model.model_dir = model_dir
        model.use_gradient_checkpointing = use_gradient_checkpointing
        model.fast_inference, model.max_num_seqs = fast_inference, max_num_seqs

        processor = processor.result()
        _PROCESSORS[model] = processor
        return model, processor

    @staticmethod
    @functools.wraps(lora.get_peft_model)
    def get_peft_model(model, *args, **kwargs):
        peft_model = lora.get_peft_model(model, *args, **kwargs)
        if model in _PROCESSORS:
            _PROCESSORS[peft_model] = _PROCESSORS[model]
        return peft_model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=None):
        """Training mode: remat per block on (as chosen at load, or `use_gradient_checkpointing`: True,
        "unsloth" (block inputs offloaded to host), "attention" (True, keeping each attention's output too),
        "dots", or False), LoRA dropout active, and the processor's tokenizer padding on the right. Returns the
        model."""
        if use_gradient_checkpointing is None:
            use_gradient_checkpointing = getattr(model, "use_gradient_checkpointing", "unsloth")
        _set_remat(model, remat_policy(use_gradient_checkpointing))
        model.training = True
        _set_padding_side(model, "right")
        return model

    @staticmethod
    def for_inference(model):
        """Inference mode: no remat, no dropout, padding on the left for batched generation. Returns the model."""
        _set_remat(model, None)
        model.training = False
        _set_padding_side(model, "left")
        return model


_LOADER = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="jaxvlm-loader")


def _load_processor(model_dir: str, family):
    from jaxvlm.processing import load_processor  # imports transformers' processors: only when loading
    return load_processor(model_dir, family)


def _check_quantization_config(hf_config, model_dir: str) -> bool:
    """True for a bitsandbytes 4-bit checkpoint; a clear error for quantizations we cannot read."""
    q = getattr(hf_config, "quantization_config", None)
    if not q:
        return False
    q = q if isinstance(q, dict) else q.to_dict()
    where = os.path.join(model_dir, "config.json")
    if q.get("quant_method") != "bitsandbytes":
        raise ValueError(f"{where}: quantization_config.quant_method={q.get('quant_method')!r} is not supported; "
                         f"expected 'bitsandbytes' (4-bit NF4)")
    if not q.get("load_in_4bit"):
        raise ValueError(f"{where}: only bitsandbytes 4-bit checkpoints can be imported (load_in_4bit is not set)")
    if q.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise ValueError(f"{where}: quantization_config.bnb_4bit_quant_type={q.get('bnb_4bit_quant_type')!r} is "
                         f"not supported; expected 'nf4'")
    return True


def remat_policy(use_gradient_checkpointing) -> str | None:
    """Our remat policy for Unsloth's `use_gradient_checkpointing` values (True, False, "unsloth") or a
    REMAT_POLICIES name. Host offload ("unsloth") needs an accelerator; on the CPU it becomes "full"."""
    if use_gradient_checkpointing in (False, None):
        return None
    policy = {True: "full", "unsloth": "offload"}.get(use_gradient_checkpointing, use_gradient_checkpointing)
    if policy not in REMAT_POLICIES:
        raise ValueError(f"use_gradient_checkpointing={use_gradient_checkpointing!r}: expected True, False, "
                         f"'unsloth' or one of {REMAT_POLICIES}")
    if policy == "offload" and jax.default_backend() == "cpu":
        warnings.warn("use_gradient_checkpointing='unsloth' offloads to host memory, which the CPU backend "
                      "cannot do: using full rematerialization instead")
        policy = "full"
    return policy


def _set_remat(model, policy) -> None:
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "remat"):
            module.remat = policy


def _set_padding_side(model, side: str) -> None:
    processor = _PROCESSORS.get(model)
    if processor is not None:
        processor.tokenizer.padding_side = side


FastModel = FastVisionModel
