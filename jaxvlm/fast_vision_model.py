"""`FastVisionModel` (= `FastModel`): Unsloth's entry points, for JAX."""
from __future__ import annotations

import functools
import json
import os
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.converters.hf_import import default_convert, load_state
from jaxvlm.converters.safetensors_io import Checkpoint
from jaxvlm import lora
from jaxvlm.layers import REMAT_POLICIES, Linear, dense_weight
from jaxvlm.models import family_for

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
    """The transformers config of `model_dir` (flat or nested config.json, old or new names)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing; expected an HF model directory")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    family = family_for(raw.get("model_type"), path)
    from transformers import AutoConfig
    return family, AutoConfig.from_pretrained(model_dir)


def _compute_dtype(dtype):
    if dtype is None:
        return jnp.bfloat16
    name = str(dtype).removeprefix("torch.")
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ValueError(f"dtype={dtype!r}: expected float32, bfloat16 or float16") from None


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
        **kwargs,
    ):
        """Import an HF checkpoint (local dir or hub id). Returns `(model, processor)`.

        `dtype` is the compute and 16-bit storage dtype (default bfloat16). The frozen base is stored
        in NF4 with `load_in_4bit` (the default, as in Unsloth), int8 with `load_in_8bit`, or in
        `dtype` with `load_in_16bit` / `full_finetuning`, which take precedence.
        """
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit cannot both be True")
        sixteen = load_in_16bit or full_finetuning
        quant = None if sixteen else "nf4" if load_in_4bit else "int8" if load_in_8bit else None
        compute_dtype = _compute_dtype(dtype)

        model_dir = resolve_model_dir(model_name, token=token, revision=revision)
        family, hf_config = read_config(model_dir)
        cfg = family.from_hf(hf_config)
        prequantized = _check_quantization_config(hf_config, model_dir)
        ckpt = Checkpoint(model_dir)
        abstract = nnx.eval_shape(lambda: family.build(cfg, compute_dtype))
        ignored = family.IGNORED_KEYS + ((r"^lm_head\.",) if cfg.tie_word_embeddings else ())
        targets = linear_weight_keys(abstract, family.QUANT_SKIP) if quant else set()
        model = load_state(abstract, ckpt, stacked=family.STACKED, renames=family.LEGACY_KEYS, ignored=ignored,
                           convert=_quantizing_convert(quant, targets, compute_dtype, prequantized))
        model.max_seq_length = max_seq_length
        model.name_or_path = model_name
        model.model_dir = model_dir
        model.use_gradient_checkpointing = use_gradient_checkpointing

        from jaxvlm.processing import load_processor
        processor = load_processor(model_dir)
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
        "unsloth" (block inputs offloaded to host), "dots", or False), LoRA dropout active, and the
        processor's tokenizer padding on the right. Returns the model."""
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


def linear_weight_keys(model, skip: tuple[str, ...]) -> set[str]:
    """The param keys of the model's Linear weights, except modules whose path contains a `skip` name."""
    keys = set()
    for path, module in model.iter_modules():
        name = ".".join(str(p) for p in path)
        if isinstance(module, Linear) and not any(s in name.split(".") for s in skip):
            keys.add(f"{name}.weight")
    return keys


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


def _quantizing_convert(quant: str | None, targets: set[str], compute_dtype, prequantized: bool):
    """The importer's convert hook: Linear weights in `targets` become NF4 / Int8 on device as they stream in.

    A checkpoint that is already 4-bit keeps its NF4 weights as they are and its float weights in float
    (its creator chose which modules to leave unquantized); with quant=None everything is dequantized.
    """
    from jaxvlm.quant import NF4, quantize_int8, quantize_nf4

    def convert(key, value, spec):
        if quant is None or key not in targets:
            return default_convert(key, value, spec)
        if isinstance(value, NF4):
            if quant == "nf4":
                return jax.device_put(value)
            dense = dense_weight(jax.device_put(value), compute_dtype)
        elif prequantized:
            return default_convert(key, value, spec)
        else:
            dense = jax.device_put(np.asarray(value).astype(compute_dtype))
        if quant == "int8":
            return quantize_int8(dense)
        quantize = quantize_nf4
        for _ in range(dense.ndim - 2):  # one NF4 per layer of a stacked weight
            quantize = jax.vmap(quantize)
        return quantize(dense)
    return convert


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
    for _, module in model.iter_modules():
        if hasattr(module, "remat"):
            module.remat = policy


def _set_padding_side(model, side: str) -> None:
    processor = _PROCESSORS.get(model)
    if processor is not None:
        processor.tokenizer.padding_side = side


FastModel = FastVisionModel
