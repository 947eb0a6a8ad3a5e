"""Export back to Hugging Face: merged 16-bit safetensors, 4-bit, LoRA adapters, and hub uploads.

Unsloth's `save_pretrained_merged` / `push_to_hub_merged`. Everything is written into a temporary
sibling directory and renamed into place at the end, so a failure leaves no half-written model.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxvlm.converters.hf_export import hf_tensors, write_safetensors
from jaxvlm.converters.hf_import import normalize_key
from jaxvlm.layers import dense_weight

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False):
    """Yields a fresh temporary directory that replaces `out_dir` when the block succeeds.

    Refuses an existing non-empty `out_dir` unless `overwrite`; on an exception the temporary
    directory is removed and `out_dir` is left as it was.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def _family(model):
    from jaxvlm.models import family_for
    return family_for(model.config.model_type, "model.config")


def model_dtype(model):
    return model.model.language_model.embed_tokens.weight.get_value().dtype


def _copy_configs(model, out_dir: str, dtype, quantization_config: dict | None = None) -> None:
    src = getattr(model, "model_dir", None)
    if src is None:
        raise ValueError("the model has no model_dir (it was not loaded with from_pretrained): "
                         "cannot write its config.json")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    if quantization_config:
        config["quantization_config"] = quantization_config
    config["dtype"] = jnp.dtype(dtype).name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    gen = os.path.join(src, "generation_config.json")
    if os.path.exists(gen):
        shutil.copy(gen, out_dir)


def merged_tensors(model, dtype):
    """(on-disk HF key, host array) of every weight with LoRA merged and NF4 dequantized, in `dtype`."""
    family = _family(model)
    dense = jax.jit(lambda v: dense_weight(v, dtype))
    for key, array in hf_tensors(model, family.STACKED, lambda v: np.asarray(dense(v))):
        yield normalize_key(key, family.EXPORT_KEYS), array


def merged_4bit_tensors(model, dtype):
    """As merged_tensors, with the Linear weights (but the family's QUANT_SKIP modules) quantized to NF4
    and written as bitsandbytes writes them (`<key>`, `<key>.absmax`, ..., `.quant_state.bitsandbytes__nf4`)."""
    from jaxvlm.fast_vision_model import linear_weight_keys
    from jaxvlm.quant import nf4_to_bnb, quantize_nf4
    family = _family(model)
    targets = {normalize_key(_per_layer_pattern(k, family.STACKED), family.EXPORT_KEYS)
               for k in linear_weight_keys(model, family.QUANT_SKIP)}
    quantize = jax.jit(quantize_nf4)
    for key, array in merged_tensors(model, dtype):
        if re.sub(r"\.\d+\.", ".N.", key) not in targets:
            yield key, array
            continue
        for suffix, tensor in nf4_to_bnb(quantize(jnp.asarray(array))).items():
            yield key + suffix, np.asarray(tensor)


def _per_layer_pattern(key: str, stacked) -> str:
    prefix = next((p for p in stacked if key.startswith(p + ".")), None)
    return key if prefix is None else f"{prefix}.N.{key[len(prefix) + 1:]}"


def _quantization_config(model, dtype) -> dict:
    """config.json's quantization_config for a merged_4bit export, as transformers + bitsandbytes write it."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": jnp.dtype(dtype).name, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": list(_family(model).QUANT_SKIP), "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def save_pretrained_merged(model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                           max_shard_size="5GB", overwrite: bool = False, **kwargs) -> None:
    """Writes an HF model directory transformers loads: config.json, generation_config.json, safetensors
    (sharded with an index above `max_shard_size`), and the processor/tokenizer given as `tokenizer`.

    save_method: "merged_16bit" (LoRA merged into the base, stored in the model's dtype), "merged_4bit"
    (the same, then NF4 in bitsandbytes' format), or "lora" (the PEFT adapter only).
    """
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r}: expected one of {', '.join(SAVE_METHODS)}")
    if save_method == "lora":
        from jaxvlm.lora import save_adapter
        with atomic_dir(save_directory, overwrite) as tmp:
            save_adapter(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return
    dtype = model_dtype(model)
    with atomic_dir(save_directory, overwrite) as tmp:
        if save_method == "merged_4bit":
            # Shard sizes are known only once quantized; 4-bit tensors are a quarter of the 16-bit ones.
            write_safetensors(merged_4bit_tensors(model, dtype), tmp, max_shard_size)
            _copy_configs(model, tmp, dtype, quantization_config=_quantization_config(model, dtype))
        else:
            write_safetensors(merged_tensors(model, dtype), tmp, max_shard_size, sizes=_sizes(model, dtype))
            _copy_configs(model, tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _sizes(model, dtype) -> list[int]:
    """Bytes of each tensor `merged_tensors` will yield, without computing any (zero-stride views)."""
    def shape_only(v):
        return np.broadcast_to(np.empty((), dtype), jax.eval_shape(lambda w: dense_weight(w, dtype), v).shape)
    return [a.nbytes for _, a in hf_tensors(model, _family(model).STACKED, shape_only)]


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit",
                       token: str | None = None, private: bool | None = None, max_shard_size="5GB",
                       commit_message: str = "Upload model trained with jaxvlm", **kwargs) -> str:
    """Saves as `save_pretrained_merged` does, then uploads the directory to the hub repo `repo_id`.

    Returns the repo URL. Raises ConnectionError when huggingface_hub is offline (HF_HUB_OFFLINE) or
    the hub cannot be reached.
    """
    from huggingface_hub import HfApi, constants
    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(f"cannot push {repo_id!r}: huggingface_hub is offline (HF_HUB_OFFLINE=1)")
    with tempfile.TemporaryDirectory() as parent:
        folder = os.path.join(parent, "export")
        save_pretrained_merged(model, folder, tokenizer, save_method=save_method, max_shard_size=max_shard_size)
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message)
        except OSError as e:  # requests' and httpx' connection errors derive from OSError
            raise ConnectionError(f"cannot push {repo_id!r} to the hub: {e}") from e
    return str(url)
