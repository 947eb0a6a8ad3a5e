"""The LLaVA composition: a vision tower, a projector and a text language model, chosen from the config's
sub-configs. One file for the models transformers builds this way:

  llava       LLaVA 1.5 (a CLIP tower) and Pixtral-12B (`llava` with a Pixtral tower), with a Llama / Mistral /
              Qwen2 text model;
  llava_next  LLaVA-NeXT: the CLIP tower on "anyres" tiles (jaxvlm.models.anyres), the tiles' features packed
              per image with `image_newline` after each row;
  mistral3    Mistral Small 3.x vision: the Pixtral tower, an RMSNorm'd projector with a patch merger (each
              spatial_merge_size x spatial_merge_size block of patches one token), the Mistral text model.

As transformers' modeling_llava / modeling_llava_next / modeling_mistral3 compute it:
  vision     the tower's `hidden_states[vision_feature_layer]` (an int, or a list whose entries are joined
             along the features; jaxvlm.models.clip_vision runs no layer past the deepest one asked for), with
             `vision_feature_select_strategy` "default" dropping CLIP's class token and "full" keeping it; the
             Pixtral tower (jaxvlm.models.pixtral_vision: every image at its own size, all images in one
             block-diagonal sequence) is taken at its last layer;
  projector  `multi_modal_projector`: linear_1, the activation, linear_2 (biases per `multimodal_projector_bias`);
             mistral3 first applies an RMSNorm (`norm`, the text config's eps) and the patch merger
             (`patch_merger.merging_layer`, no bias) to each image's patch grid;
  language   jaxvlm.models.llama_text; the projected features replace the image tokens' embeddings in order
             (transformers' masked_scatter). Pixtral's `[IMG_BREAK]` / `[IMG_END]` tokens are text.
Positions count real tokens only (as transformers' generate sets them; its forward without position_ids counts
padding too). Attribute paths mirror transformers 5's in-memory names (`model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.image_newline`, `model.language_model.*`, `lm_head`).

Not supported (ConfigError): other vision towers (SigLIP: LLaVA-OneVision's own model_type), a Pixtral tower read
below its last layer or with the "default" strategy (it has no class token), mistral3 with several feature layers
(transformers' norm would not fit them either).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvlm.layers import ACTIVATIONS, Activation, Linear, RMSNorm, scatter_rows
from jaxvlm.models import anyres
from jaxvlm.models.base import ConfigError, FamilyInfo, TinySpec, VisionLanguageModel
from jaxvlm.models.clip_vision import CLIPVisionConfig, CLIPVisionTower, clip_config_from_hf, feature_layer_indices
from jaxvlm.models.llama_text import LlamaTextConfig, LlamaTextModel, text_config_from_hf
from jaxvlm.models.pixtral_vision import (PixtralVisionConfig, PixtralVisionTower, pixtral_config_from_hf,
                                          prepare_pixtral_inputs)
from jaxvlm.models.qwen_text import KVCache, LMHeadMethods
from jaxvlm.models.qwen_vision import ladder, segment_index
from jaxvlm.models.siglip import patchify

MODEL_TYPES = ("llava", "llava_next", "mistral3")
VISION_TOWERS = ("clip_vision_model", "pixtral")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    model_type: str
    text: LlamaTextConfig
    vision: CLIPVisionConfig | PixtralVisionConfig
    feature_layers: tuple[int, ...]  # indices into the tower's hidden states (0: embeddings), joined in order
    keep_class_token: bool  # vision_feature_select_strategy "full" (CLIP's class token kept) vs "default"
    projector_act: str
    projector_bias: bool
    image_token_id: int
    tie_word_embeddings: bool
    spatial_merge_size: int = 1  # mistral3's patch merger (1: none)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # llava_next's anyres resolutions (height, width)

    @property
    def pixtral(self) -> bool:
        return isinstance(self.vision, PixtralVisionConfig)

    @property
    def feature_layer(self):
        """transformers' vision_feature_layer for the tower (an int or a tuple)."""
        return self.feature_layers[0] if len(self.feature_layers) == 1 else self.feature_layers

    @property
    def max_position_embeddings(self) -> int | None:
        return self.text.max_position_embeddings


def from_hf(hf) -> LlavaConfig:
    """Our config from a transformers LlavaConfig / LlavaNextConfig / Mistral3Config; ConfigError naming the field."""
    kind = hf.model_type
    if kind not in MODEL_TYPES:
        raise ConfigError(f"model_type {kind!r} is not one of the LLaVA compositions {MODEL_TYPES}")
    v = hf.vision_config
    tower = getattr(v, "model_type", None)
    if tower not in VISION_TOWERS or (kind != "llava" and tower != {"llava_next": "clip_vision_model",
                                                                        "mistral3": "pixtral"}[kind]):
        raise ConfigError(f"vision_config.model_type={tower!r}: {kind} takes "
                          f"{'a CLIP or a Pixtral tower' if kind == 'llava' else 'its own tower'} "
                          f"({VISION_TOWERS})")
    vision = clip_config_from_hf(v) if tower == "clip_vision_model" else pixtral_config_from_hf(v)
    strategy = getattr(hf, "vision_feature_select_strategy", "full") if kind != "mistral3" else "full"
    if strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy={strategy!r}: expected 'default' or 'full'")
    layer = hf.vision_feature_layer
    if isinstance(vision, PixtralVisionConfig):
        n = vision.num_hidden_layers
        if layer not in (-1, n) or strategy != "full":
            raise ConfigError(f"vision_feature_layer={layer!r}, vision_feature_select_strategy={strategy!r}: the "
                              f"Pixtral tower is read at its last layer (-1) with 'full' (no class token)")
        layers = (n,)
    else:
        layers = feature_layer_indices(vision, layer)
    act = hf.projector_hidden_act
    if act not in ACTIVATIONS:
        raise ConfigError(f"projector_hidden_act={act!r}: expected one of {sorted(ACTIVATIONS)}")
    merge = int(getattr(hf, "spatial_merge_size", 1)) if kind == "mistral3" else 1
    if merge < 1:
        raise ConfigError(f"spatial_merge_size={merge}: expected a positive int")
    pinpoints = ()
    if kind == "llava_next":
        try:
            pinpoints = tuple(anyres.pinpoints(hf.image_grid_pinpoints, vision.image_size))
        except ValueError as e:
            raise ConfigError(f"image_grid_pinpoints: {e}") from None
        if strategy != "default":
            raise ConfigError(f"vision_feature_select_strategy={strategy!r}: llava_next packs the patch grid "
                              f"without the class token ('default'), as transformers does")
    t = hf.text_config
    tie = getattr(hf, "tie_word_embeddings", None)  # transformers 5 ties on the top-level config's word
    return LlavaConfig(
        model_type=kind, text=text_config_from_hf(t), vision=vision, feature_layers=layers,
        keep_class_token=strategy == "full", projector_act=act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)), image_token_id=int(hf.image_token_id),
        tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", False) if tie is None else tie),
        spatial_merge_size=merge, grid_pinpoints=pinpoints)


# ----------------------------------------------------------------------------------------------
# Host-side inputs.


def _tokens_per_tile(cfg: LlavaConfig) -> int:
    return cfg.vision.num_patches + (1 if cfg.keep_class_token else 0)


def merge_index(grids: np.ndarray, merge: int, n_rows: int) -> np.ndarray:
    """int32 `[merged tokens, merge**2]`: for each image's grid (rows, cols of patches, images laid end to end in
    the packed sequence) and each merge x merge block of it, row-major (a last partial row or column dropped, as
    transformers' unfold drops it), the block's patch rows in (row, col) order; then padding entries (row 0) up
    to a multiple fitting `n_rows // merge**2` tokens."""
    out, start = [], 0
    for gh, gw in grids:
        r, c = np.meshgrid(np.arange(gh // merge), np.arange(gw // merge), indexing="ij")
        i, j = np.meshgrid(np.arange(merge), np.arange(merge), indexing="ij")
        rows = (r.reshape(-1, 1) * merge + i.reshape(1, -1)) * gw + c.reshape(-1, 1) * merge + j.reshape(1, -1)
        out.append(start + rows)
        start += gh * gw
    index = np.concatenate(out) if out else np.zeros((0, merge * merge), np.int64)
    pad = max(n_rows // (merge * merge) - len(index), 0)
    return np.concatenate([index, np.zeros((pad, merge * merge), np.int64)]).astype(np.int32)


def prepare_inputs(cfg: LlavaConfig, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                   n_pad_patches: int = 0, **unused) -> dict[str, np.ndarray]:
    """The arrays the jit'd forward takes, from what the family's processor returns.

    pixel_values: CLIP `[images, 3, size, size]` (llava), `[images, tiles, 3, size, size]` padded with zero tiles
    (llava_next, with `image_sizes`), or `[images, 3, H, W]` padded at the bottom and right (Pixtral, with
    `image_sizes`, each image's real (height, width)). `n_pad_patches`: that many images at the end of
    pixel_values are the collator's padding (their outputs are dropped). The vision rows are padded to a
    `ladder` size, so that batches of similar sizes share a compiled program.
    """
    ids = np.asarray(input_ids).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, seq], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    out = {"input_ids": ids, "attention_mask": mask,
           "positions": np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)}
    image_tokens = ids == cfg.image_token_id
    n_tokens = int(image_tokens.sum())
    if pixel_values is None:
        if n_tokens:
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}) but no pixel_values "
                             f"were given")
        return out
    n_images = len(pixel_values) - int(n_pad_patches)
    if n_images < 0:
        raise ValueError(f"n_pad_patches={n_pad_patches}: more than the {len(pixel_values)} images of pixel_values")
    if cfg.model_type != "llava_next" and not cfg.pixtral:
        x = np.asarray(pixel_values, np.float32)[:n_images]
        patches = patchify(cfg.vision, x)
        rows = ladder(max(n_images, 1))
        out["patches"] = np.concatenate([patches, np.zeros((rows - n_images, *patches.shape[1:]), np.float32)])
        n_features = n_images * _tokens_per_tile(cfg)
    elif not cfg.pixtral:
        if image_sizes is None:
            raise ValueError("llava_next: pixel_values need image_sizes (what LlavaNextProcessor returns with them)")
        sizes = np.asarray(image_sizes).reshape(-1, 2)[:n_images]
        layout = anyres.anyres_layout(sizes, cfg.grid_pinpoints, cfg.vision.image_size,
                                      cfg.vision.patches_per_side)
        tiles = anyres.select_tiles(np.asarray(pixel_values, np.float32)[:n_images], sizes, cfg.grid_pinpoints)
        patches = patchify(cfg.vision, tiles)
        rows = ladder(max(len(tiles), 1))
        out["patches"] = np.concatenate([patches, np.zeros((rows - len(tiles), *patches.shape[1:]), np.float32)])
        # The table the forward gathers from has every (padded) tile's rows, then image_newline.
        out["feature_index"] = np.where(layout.feature_index == layout.n_rows, rows * cfg.vision.num_patches,
                                        layout.feature_index).astype(np.int32)
        n_features = len(layout.feature_index)
    else:
        if image_sizes is None:
            raise ValueError(f"{cfg.model_type} with a Pixtral tower: pixel_values need image_sizes (what "
                             f"PixtralProcessor returns with them)")
        images = pixel_values[:n_images] if isinstance(pixel_values, (list, tuple)) else \
            np.asarray(pixel_values, np.float32)[:n_images]
        sizes = np.asarray(image_sizes).reshape(-1, 2)[:n_images]
        p, m = cfg.vision.patch_size, cfg.spatial_merge_size
        grids = sizes // p
        n_patches = int(grids.prod(axis=1).sum())
        bucket = ladder(-(-n_patches // (m * m))) * m * m
        vision = (prepare_pixtral_inputs(cfg.vision, list(images), sizes, pad_to=bucket) if n_images else
                  _no_pixtral_images(cfg.vision, bucket))
        out.update(patches=vision["patches"], patch_positions=vision["positions"], attn_index=vision["attn_index"])
        if m > 1:
            out["merge_index"] = merge_index(grids, m, bucket)
        n_features = int(((grids // m).prod(axis=1)).sum())
    if n_tokens != n_features:
        raise ValueError(f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}), the images give "
                         f"{n_features} features")
    flat = np.flatnonzero(image_tokens.reshape(-1))
    n_rows = _feature_rows(cfg, out)
    pad = ids.size + np.arange(n_rows - len(flat))  # out of range, distinct: dropped
    out["image_pos"] = np.concatenate([flat, pad]).astype(np.int32)
    return out


def _no_pixtral_images(vcfg: PixtralVisionConfig, rows: int) -> dict[str, np.ndarray]:
    """The Pixtral tower's arrays for a batch whose images are all padding: `rows` zero patches, one segment."""
    return {"patches": np.zeros((rows, vcfg.patch_dim), np.float32), "positions": np.zeros((rows, 2), np.int32),
            "attn_index": segment_index(np.zeros(rows, np.int64))}


def _feature_rows(cfg: LlavaConfig, inputs) -> int:
    """How many feature rows the forward gives for these inputs (image tokens and padding)."""
    if "feature_index" in inputs:
        return len(inputs["feature_index"])
    if "merge_index" in inputs:
        return len(inputs["merge_index"])
    if cfg.pixtral:
        return len(inputs["patches"])
    return len(inputs["patches"]) * _tokens_per_tile(cfg)


# ----------------------------------------------------------------------------------------------
# The network.


class PatchMerger(nnx.Module):
    """mistral3's `merging_layer` (no bias) over each merge x merge block of patch features."""

    def __init__(self, cfg: LlavaConfig, dtype):
        d, m = cfg.vision.hidden_size, cfg.spatial_merge_size
        self.merging_layer = Linear(d * m * m, d, bias=False, dtype=dtype)

    def __call__(self, x: jax.Array, index: jax.Array) -> jax.Array:
        """`x [patches, d]`, `index [tokens, m*m]` (`merge_index`) -> `[tokens, d]`: each block's features joined
        feature-major (feature c of block position k at c * m*m + k, as transformers' unfold lays them)."""
        blocks = jnp.take(x, index, axis=0)  # [tokens, m*m, d]
        return self.merging_layer(blocks.transpose(0, 2, 1).reshape(index.shape[0], -1))


class MultiModalProjector(nnx.Module):
    """linear_1 (vision width x feature layers -> text width), the activation, linear_2; mistral3's `norm` and
    `patch_merger` before them."""

    def __init__(self, cfg: LlavaConfig, dtype):
        d_in, d = cfg.vision.hidden_size * len(cfg.feature_layers), cfg.text.hidden_size
        if cfg.model_type == "mistral3":
            self.norm = RMSNorm(cfg.vision.hidden_size, eps=cfg.text.rms_norm_eps, dtype=dtype)
            self.patch_merger = PatchMerger(cfg, dtype)
        self.linear_1 = Linear(d_in, d, bias=cfg.projector_bias, dtype=dtype)
        self.act = Activation(cfg.projector_act)
        self.linear_2 = Linear(d, d, bias=cfg.projector_bias, dtype=dtype)

    def __call__(self, x: jax.Array, merge_index: jax.Array | None = None) -> jax.Array:
        if merge_index is not None:
            x = self.patch_merger(self.norm(x), merge_index)
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModel(nnx.Module):
    def __init__(self, cfg: LlavaConfig, dtype):
        self.vision_tower = (PixtralVisionTower(cfg.vision, dtype) if cfg.pixtral else
                             CLIPVisionTower(cfg.vision, dtype))
        self.multi_modal_projector = MultiModalProjector(cfg, dtype)
        if cfg.model_type == "llava_next":
            self.image_newline = nnx.Param(jnp.zeros((cfg.text.hidden_size,), dtype))
        self.language_model = LlamaTextModel(cfg.text, dtype)


def _llama_template(bos: str, eos: str) -> str:
    # LLaVA 1.5's conversation format: "USER: <image>\n... ASSISTANT: ...", images before the turn's text; the
    # reply ends with the end-of-sequence token so that generation learns to stop.
    return (
        f"{{{{ '{bos}' }}}}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set prefix = '' %}{% else %}"
        "{% set prefix = message['role'].upper() + ': ' %}{% endif %}{{ prefix }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
        "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{% endif %}"
        f"{{% if message['role'] == 'assistant' %}}{eos}{{% endif %}}{{{{ ' ' }}}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


# Mistral's instruction format: "<s>[INST]images then text[/INST]reply</s>", a system message before the
# first user turn's text.
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set system = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}[INST]{{ system if loop.first else '' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] if item['type'] == 'image' %}[IMG]{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{% endif %}"
    "[/INST]"
    "{% else %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endif %}"
    "{% endfor %}")

_CLIP_IMAGE_PROCESSOR = {
    # 28-pixel images of 7-pixel patches (16 patches).
    "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28},
    "crop_size": {"height": 28, "width": 28}, "do_resize": True, "do_center_crop": True, "resample": 3,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
_LLAVA_TOKENS = {"<pad>": 285, "<s>": 286, "</s>": 287, "<image>": 288}
_MISTRAL_TOKENS = {"<pad>": 285, "<s>": 286, "</s>": 287, "[INST]": 288, "[/INST]": 289, "[IMG]": 290,
                   "[IMG_BREAK]": 291, "[IMG_END]": 292}


def _tiny_text(kind: str, tokens: dict, size: str, overrides: dict) -> dict:
    """A tiny Llama / Mistral text config: odd widths, grouped-query attention; Mistral's head_dim not
    hidden / heads (as Mistral Small 3's)."""
    text = dict(model_type=kind, vocab_size=300, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=1024,
                pad_token_id=tokens["<pad>"], bos_token_id=tokens["<s>"], eos_token_id=tokens["</s>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    if kind == "mistral":
        text.update(head_dim=20, sliding_window=None)
    if size == "demo":
        text.update(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=2)
    text.update(overrides)
    return text


class _LlavaBase(LMHeadMethods, VisionLanguageModel):
    """The composition (see the module docstring): `model.vision_tower`, `model.multi_modal_projector`,
    (`model.image_newline`), `model.language_model`, `lm_head` (None when tied)."""

    INFO: FamilyInfo
    PIXEL_BUCKET_MIN = 1  # pixel_values rows are whole images

    def __init__(self, cfg: LlavaConfig, dtype=jnp.bfloat16):
        super().__init__(cfg, dtype)
        self.model = LlavaModel(cfg, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype))

    @classmethod
    def config_from_hf(cls, hf_config) -> LlavaConfig:
        if hf_config.model_type not in cls.INFO.model_types:
            raise ConfigError(f"model_type {hf_config.model_type!r}: {cls.__name__} implements "
                              f"{cls.INFO.model_types}")
        return from_hf(hf_config)

    def prepare_inputs(self, **processor_outputs) -> dict[str, np.ndarray]:
        return prepare_inputs(self.config, **processor_outputs)

    def pixel_row_shape(self, image_processor) -> tuple[int, ...]:
        v = self.config.vision
        if self.config.pixtral:  # images of any size up to image_size: the collator pads them to the largest
            return (v.num_channels, v.image_size, v.image_size)
        if self.config.model_type == "llava_next":
            tiles = 1 + max(h * w for h, w in self.config.grid_pinpoints) // v.image_size ** 2  # and the base tile
            return (tiles, v.num_channels, v.image_size, v.image_size)
        return (v.num_channels, v.image_size, v.image_size)

    def image_features(self, inputs: dict[str, jax.Array], dtype) -> jax.Array:
        """The projected features that replace the image tokens, in order, then padding rows: `[rows, hidden]`."""
        cfg = self.config
        tower = self.model.vision_tower
        if cfg.pixtral:
            feats = tower(inputs["patches"], inputs["patch_positions"], inputs["attn_index"], dtype)
            return self.model.multi_modal_projector(feats, inputs.get("merge_index"))
        states = tower(inputs["patches"], dtype, cfg.feature_layer)
        if not cfg.keep_class_token:
            states = tuple(s[:, 1:] for s in states)
        feats = self.model.multi_modal_projector(jnp.concatenate(states, axis=-1))  # [tiles, tokens, hidden]
        if "feature_index" in inputs:
            return anyres.pack_features(feats, self.model.image_newline.get_value().astype(feats.dtype),
                                        inputs["feature_index"])
        return feats.reshape(-1, feats.shape[-1])

    def embed(self, inputs: dict[str, jax.Array]) -> jax.Array:
        h = self.model.language_model.embed_tokens(inputs["input_ids"])
        if "patches" in inputs:
            h = scatter_rows(h, inputs["image_pos"], self.image_features(inputs, h.dtype))
        return h

    def hidden_states(self, inputs: dict[str, jax.Array]) -> jax.Array:
        return self.model.language_model(self.embed(inputs), inputs["positions"], inputs["attention_mask"])[0]

    # -- generation (logits and max_positions: LMHeadMethods) ------------------------------------

    def init_cache(self, batch: int, length: int) -> KVCache:
        return self.model.language_model.init_cache(batch, length, self.dtype)

    def prefill(self, inputs, cache, key_mask):
        return self.model.language_model(self.embed(inputs), inputs["positions"], key_mask, cache, 0)

    def decode(self, tokens, positions, cache, key_mask, index):
        lm = self.model.language_model
        return lm(lm.embed_tokens(tokens[:, None]), positions[:, None], key_mask, cache, index)

    def next_positions(self, inputs) -> np.ndarray:
        return (np.asarray(inputs["positions"]).max(axis=1) + 1).astype(np.int32)


# The checkpoints' names on disk (transformers 4.x, and what transformers 5's save_pretrained writes): the language
# model under language_model.model, its head language_model.lm_head, the CLIP tower under vision_tower.vision_model
# (4.x) or vision_tower (5).
_LEGACY_KEYS = ((r"^language_model\.model\.", "model.language_model."),
                (r"^language_model\.lm_head\.", "lm_head."),
                (r"^vision_tower\.vision_model\.", "model.vision_tower."),
                (r"^vision_tower\.", "model.vision_tower."),
                (r"^multi_modal_projector\.", "model.multi_modal_projector."),
                (r"^image_newline$", "model.image_newline"))
# Exports write transformers 5's save_pretrained names, which it and 4.x's key mapping read.
_EXPORT_KEYS = ((r"^model\.language_model\.", "language_model.model."),
                (r"^lm_head\.", "language_model.lm_head."),
                (r"^model\.vision_tower\.", "vision_tower."),
                (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
                (r"^model\.image_newline$", "image_newline"))
_STACKED = ("model.language_model.layers", "model.vision_tower.encoder.layers",
            "model.vision_tower.transformer.layers")


def _info(model_type: str, processors: tuple[str, ...], vision_tokens: tuple[str, ...], instruction: str, response: str):
    return FamilyInfo(
        model_types=(model_type,), stacked=_STACKED, legacy_keys=_LEGACY_KEYS, export_keys=_EXPORT_KEYS,
        # Older checkpoints carry the CLIP tower's position_ids buffer.
        ignored_keys=(r"^model\.vision_tower\.embeddings\.position_ids$",),
        # Unsloth's SKIP_QUANTIZATION_MODULES: the projector and lm_head stay 16-bit.
        quant_skip=("lm_head", "multi_modal_projector"),
        processor_classes=tuple((model_type, name) for name in processors), vision_tokens=vision_tokens,
        instruction_part=instruction, response_part=response)


class LlavaForConditionalGeneration(_LlavaBase):
    """LLaVA 1.5 (CLIP tower) and Pixtral-12B (`llava` with a Pixtral tower; its checkpoints name their
    PixtralProcessor and carry Mistral's chat template)."""

    INFO = _info("llava", ("LlavaProcessor", "PixtralProcessor"), ("<image>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"), "USER:", "ASSISTANT:")
    TINY = TinySpec(special_tokens=_LLAVA_TOKENS, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                    chat_template=_llama_template("<s>", "</s>"), image_processor=_CLIP_IMAGE_PROCESSOR,
                    processor={"patch_size": 7, "vision_feature_select_strategy": "default",
                               "num_additional_image_tokens": 1, "image_token": "<image>"})

    @classmethod
    def tiny_config(cls, model_type: str, size: str = "test", **text_overrides):
        """LLaVA 1.5's layout: CLIP (28-pixel images, 7-pixel patches, quick_gelu) read at its second-to-last
        layer without the class token, a Llama text model, the projector with biases."""
        import transformers
        tokens = cls.TINY.special_tokens
        vision = dict(model_type="clip_vision_model", hidden_size=32 if size == "test" else 64,
                      intermediate_size=44 if size == "test" else 128, num_hidden_layers=3, num_attention_heads=2,
                      image_size=28, patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      projection_dim=32)
        return transformers.LlavaConfig(
            text_config=_tiny_text("llama", tokens, size, text_overrides), vision_config=vision,
            image_token_id=tokens["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default",
            projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False)


class Mistral3ForConditionalGeneration(_LlavaBase):
    """Mistral Small 3.x vision: the Pixtral tower, the patch merger, the Mistral text model."""

    INFO = _info("mistral3", ("PixtralProcessor",), ("[IMG]", "[IMG_BREAK]", "[IMG_END]"), "[INST]", "[/INST]")
    TINY = TinySpec(
        special_tokens=_MISTRAL_TOKENS, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
        chat_template=_MISTRAL_TEMPLATE,
        # Images up to 56 pixels on their longest edge, in 7-pixel patches merged 2 x 2.
        image_processor={"image_processor_type": "PixtralImageProcessor", "size": {"longest_edge": 56},
                         "patch_size": {"height": 14, "width": 14}, "do_resize": True, "resample": 3,
                         "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                         "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                         "image_std": [0.26862954, 0.26130258, 0.27577711]},
        processor={"patch_size": 7, "spatial_merge_size": 2, "image_token": "[IMG]",
                   "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"})

    @classmethod
    def tiny_config(cls, model_type: str, size: str = "test", **text_overrides):
        """Mistral Small 3's layout: a Pixtral tower (56-pixel images, 7-pixel patches), the 2 x 2 patch merger,
        a projector without biases, a Mistral text model whose head_dim is not hidden / heads."""
        import transformers
        tokens = cls.TINY.special_tokens
        width = 32 if size == "test" else 64
        vision = dict(model_type="pixtral", hidden_size=width, intermediate_size=width + 12, num_hidden_layers=2,
                      num_attention_heads=2, image_size=56, patch_size=7, hidden_act="silu", head_dim=width // 2,
                      rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
        return transformers.Mistral3Config(
            text_config=_tiny_text("mistral", tokens, size, text_overrides), vision_config=vision,
            image_token_id=tokens["[IMG]"], spatial_merge_size=2, vision_feature_layer=-1,
            projector_hidden_act="gelu", multimodal_projector_bias=False, tie_word_embeddings=False)


class LlavaNextForConditionalGeneration(_LlavaBase):
    """LLaVA-NeXT (v1.6): the CLIP tower on anyres tiles, `model.image_newline`."""

    INFO = _info("llava_next", ("LlavaNextProcessor",), ("<image>",), "USER:", "ASSISTANT:")
    TINY = TinySpec(
        special_tokens=_LLAVA_TOKENS, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
        chat_template=_llama_template("<s>", "</s>"),
        image_processor={**_CLIP_IMAGE_PROCESSOR, "image_processor_type": "LlavaNextImageProcessor",
                         "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56], [28, 84]], "do_pad": True},
        processor={"patch_size": 7, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
                   "image_token": "<image>"})

    @classmethod
    def tiny_config(cls, model_type: str, size: str = "test", **text_overrides):
        """LLaVA-NeXT's layout: LLaVA 1.5's tower and projector, four grid pinpoints of 28-pixel tiles (1 x 2, 2 x 1,
        2 x 2, 1 x 3), a Mistral text model whose head_dim is not hidden / heads."""
        import transformers
        llava = LlavaForConditionalGeneration.tiny_config("llava", size)
        tokens = cls.TINY.special_tokens
        return transformers.LlavaNextConfig(
            text_config=_tiny_text("mistral", tokens, size, text_overrides), vision_config=llava.vision_config.to_dict(),
            image_token_id=tokens["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_grid_pinpoints=cls.TINY.image_processor["image_grid_pinpoints"], projector_hidden_act="gelu",
            multimodal_projector_bias=True, tie_word_embeddings=False)
