"""Qwen3-VL MoE: Qwen3-VL (jaxvlm.models.qwen3_vl) with a sparse mixture of experts as every decoder layer's MLP.

As transformers' modeling_qwen3_vl_moe.py does it, the MLP of a decoder layer is
  router  `mlp.gate.weight [experts, hidden]`: logits in the compute dtype, softmax in fp32, the top
          `num_experts_per_tok` probabilities renormalised to sum to 1, cast back;
  experts `mlp.experts.gate_up_proj [experts, 2 * moe_intermediate, hidden]` (gate rows, then up rows) and
          `mlp.experts.down_proj [experts, hidden, moe_intermediate]`: each token goes through its chosen
          experts' gated MLPs (jaxvlm.layers.Experts, a grouped matmul over the tokens sorted by expert),
          and their outputs are summed with the routing weights.
The vision tower, deepstack, M-RoPE, host inputs and generation are Qwen3-VL's. The param tree mirrors transformers'
in-memory names and layout, layers stacked (`model.language_model.layers.mlp.experts.gate_up_proj
[layers, experts, 2I, hidden]`). Checkpoints on the hub store the experts with their last two axes swapped
([experts, hidden, 2I], [experts, I, hidden]); both layouts import (INFO.transposed_keys), and merged exports write
the in-memory one, as transformers 5's save_pretrained does.

Not supported: the dense `mlp_only_layers` / `decoder_sparse_step` layouts (no released checkpoint uses them), and the
router's load-balancing loss (transformers adds it only with `output_router_logits`, off by default).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvlm.layers import Experts, RMSNorm, linear
from jaxvlm.models.base import ConfigError
from jaxvlm.models.qwen3_vl import (Qwen3VLForConditionalGeneration, Qwen3VLModel, TextConfig, TextModel,
                                    _tiny_config, from_hf, text_config_from_hf)
from jaxvlm.models.qwen_text import Attention, DecoderLayer

MODEL_TYPE = "qwen3_vl_moe"


@dataclasses.dataclass(frozen=True)
class MoeTextConfig(TextConfig):
    num_experts: int
    num_experts_per_tok: int  # experts per token (top-k)
    moe_intermediate_size: int  # each expert's MLP width


def moe_text_config_from_hf(t) -> MoeTextConfig:
    """The language model's config from a transformers Qwen3VLMoeTextConfig."""
    if getattr(t, "mlp_only_layers", None):
        raise ConfigError(f"text_config.mlp_only_layers={list(t.mlp_only_layers)}: dense MLP layers are not supported; "
                          f"expected [] (every decoder layer sparse, as in the released checkpoints)")
    if getattr(t, "decoder_sparse_step", 1) != 1:
        raise ConfigError(f"text_config.decoder_sparse_step={t.decoder_sparse_step}: only 1 (every decoder layer "
                          f"sparse) is supported")
    if not 0 < t.num_experts_per_tok <= t.num_experts:
        raise ConfigError(f"text_config.num_experts_per_tok={t.num_experts_per_tok}: expected 1..num_experts="
                          f"{t.num_experts}")
    return text_config_from_hf(t, MoeTextConfig, num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                               moe_intermediate_size=t.moe_intermediate_size)


class TopKRouter(nnx.Module):
    """`weight [*stack, experts, hidden]`. Not a Linear, as transformers' router is no nn.Linear: Unsloth's regex
    and PEFT never target it, and 4-bit modes keep it 16-bit."""

    def __init__(self, cfg: MoeTextConfig, dtype, stack):
        self.weight = nnx.Param(jnp.zeros((*stack, cfg.num_experts, cfg.hidden_size), dtype))
        self.top_k = cfg.num_experts_per_tok

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(routing weights [tokens, k] in x's dtype, expert indices [tokens, k]) for `x [tokens, hidden]`."""
        logits = linear(x, self.weight.get_value())
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, index = jax.lax.top_k(probs, self.top_k)
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights.astype(logits.dtype), index


class SparseMoeBlock(nnx.Module):
    """`gate` (the router) and `experts`, transformers' Qwen3VLMoeTextSparseMoeBlock."""

    def __init__(self, cfg: MoeTextConfig, dtype, stack):
        self.gate = TopKRouter(cfg, dtype, stack)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act,
                               dtype=dtype, stack=stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        weights, index = self.gate(flat)
        return self.experts(flat, index, weights).reshape(b, t, d)


class MoeDecoderLayer(DecoderLayer):
    """Qwen3-VL's decoder layer (its call) with the sparse MoE block as `mlp`."""

    def __init__(self, cfg: MoeTextConfig, dtype, stack):
        self.self_attn = Attention(cfg, dtype, stack)
        self.mlp = SparseMoeBlock(cfg, dtype, stack)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, stack=stack)


class MoeTextModel(TextModel):
    LAYER = MoeDecoderLayer


class Qwen3VLMoeModel(Qwen3VLModel):
    TEXT_MODEL = MoeTextModel


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL MoE: `model.visual`, `model.language_model` (sparse MoE layers), `lm_head` (absent when tied)."""

    INFO = dataclasses.replace(
        Qwen3VLForConditionalGeneration.INFO,
        model_types=(MODEL_TYPE,),
        # Unsloth keeps the MoE routers (`gate`) 16-bit too; they are no Linear, so bitsandbytes would anyway.
        # The experts are quantized in 4-bit mode (jaxvlm.quantize), but written 16-bit by a merged 4-bit
        # export: bitsandbytes quantizes Linear weights only, so transformers keeps these 3-D params in 16-bit.
        quant_skip=(*Qwen3VLForConditionalGeneration.INFO.quant_skip, "gate"),
        processor_classes=((MODEL_TYPE, "Qwen3VLProcessor"),),
        transposed_keys=(r"\.mlp\.experts\.(gate_up_proj|down_proj)$",),
    )
    MODEL = Qwen3VLMoeModel

    @classmethod
    def config_from_hf(cls, hf_config):
        if hf_config.model_type != MODEL_TYPE:
            raise ConfigError(f"model_type {hf_config.model_type!r} is not a Qwen3-VL MoE model ({MODEL_TYPE})")
        return from_hf(hf_config, text=moe_text_config_from_hf(hf_config.text_config))

    @classmethod
    def tiny_config(cls, model_type: str, size: str = "test", **text_overrides):
        """Qwen3-VL's tiny config with 8 experts, 2 per token, an expert width whose 2I differs from the hidden
        size (so the hub's and the in-memory expert layouts differ in shape)."""
        import transformers
        text_overrides = dict(text_overrides)
        tie = text_overrides.pop("tie_word_embeddings", False)
        dense = _tiny_config(size, cls.TINY.special_tokens, {})

        def fields(sub):
            return {k: v for k, v in sub.to_diff_dict().items() if k not in ("model_type", "transformers_version")}
        text = {**fields(dense.text_config), "num_experts": 8, "num_experts_per_tok": 2,
                "moe_intermediate_size": 36 if size == "test" else 72, "decoder_sparse_step": 1, "mlp_only_layers": []}
        text.update(text_overrides)
        return transformers.Qwen3VLMoeConfig(
            text_config=text, vision_config=fields(dense.vision_config), image_token_id=dense.image_token_id,
            video_token_id=dense.video_token_id, vision_start_token_id=dense.vision_start_token_id,
            vision_end_token_id=dense.vision_end_token_id, tie_word_embeddings=tie)
