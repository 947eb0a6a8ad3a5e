"""Tiny random-weight models of any registered family, for tests and first tries: offline, no torch.

The config comes from the family (`tiny_config`), the tokenizer is a word-level vocabulary holding the
family's special tokens at the ids its config names (`TINY.special_tokens`), with the family's chat
template; the image and video processor configs keep images and videos small.
"""
import json
import os

VOCAB = 300
SIZES = ("test", "demo")

_WORDS = ["<unk>", "\n", *"abcdefghijklmnopqrstuvwxyz0123456789", *".,?!:;'\"-()/", *"""
    you are helpful assistant system user what is this that the image picture photo describe digit number
    in of to and it how many there color red green blue black white one two three four five six seven eight
    nine zero answer question write please shows show see do does which where who can with on for from
    model""".split()]


def _family(model_type: str):
    from jaxvlm.models import model_class
    return model_class(model_type, "jaxvlm.tiny")


def tiny_config(model_type: str, size: str = "test", **text_overrides):
    """The family's tiny transformers config ("test" or "demo" size)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {SIZES}")
    return _family(model_type).tiny_config(model_type, size, **text_overrides)


def tiny_tokenizer(model_type: str):
    """A word-level tokenizer whose ids cover 0..VOCAB-1, the family's special tokens at their ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    spec = _family(model_type).TINY
    vocab = {w: i for i, w in enumerate(_WORDS)}
    vocab.update(spec.special_tokens)
    # Fill the unused ids so that any id a random model generates decodes to something.
    used = set(vocab.values())
    vocab.update({f"tok{i}": i for i in range(VOCAB) if i not in used})
    if len(vocab) != VOCAB or max(vocab.values()) != VOCAB - 1:
        raise ValueError(f"{model_type}: the tiny special token ids overlap the word ids or leave {VOCAB} ids")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Words, single punctuation marks and newlines are tokens; other whitespace only separates them.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special_tokens])
    extra = {"bos_token": spec.bos_token} if spec.bos_token else {}
    if spec.extra_special_tokens:
        extra["extra_special_tokens"] = dict(spec.extra_special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=spec.pad_token,
                                   eos_token=spec.eos_token, chat_template=spec.chat_template, **extra)


def save_tiny_processor(path, model_type):
    """Writes the tiny tokenizer and the family's small-image (and small-video) processor configs into
    directory `path`, laid out as in the family's checkpoints on the hub (tokenizer files, chat template,
    preprocessor_config.json and video_preprocessor_config.json naming the processor class)."""
    family = _family(model_type)
    os.makedirs(path, exist_ok=True)
    tiny_tokenizer(model_type).save_pretrained(path)
    processor_class = family.INFO.processor_class(model_type)
    configs = {"preprocessor_config.json": family.TINY.image_processor,
               "video_preprocessor_config.json": family.TINY.video_processor,
               "processor_config.json": family.TINY.processor}
    for name, config in configs.items():
        if config is not None:
            with open(os.path.join(path, name), "w") as f:
                json.dump({**config, "processor_class": processor_class}, f, indent=2)


def save_random_model(path, model_type="qwen2_vl", seed=0, std=0.02, size="test"):
    """Writes a tiny random-weight model (config.json, model.safetensors, processor) to `path`.

    Needs neither torch nor the hub: the weights are drawn for the shapes jaxvlm's own model has and
    written under transformers' key names, so transformers loads the directory too.
    """
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from safetensors.numpy import save_file

    from jaxvlm.converters.hf_export import hf_tensors
    from jaxvlm.layers import LayerNorm, RMSNorm
    from jaxvlm.paths import path_key, split_layer

    hf_config = tiny_config(model_type, size)
    family = _family(model_type)
    model = nnx.eval_shape(lambda: family(family.config_from_hf(hf_config), jnp.float32))
    rng = np.random.default_rng(seed)
    tensors = {}
    norm_scales = {f"{path_key(p)}.weight" for p, m in nnx.iter_modules(model)
                   if isinstance(m, (RMSNorm, LayerNorm)) and not getattr(m, "ZERO_CENTERED", False)}
    shape_only = lambda v: np.broadcast_to(np.empty((), np.float32), v.shape)  # noqa: E731
    for key, array in hf_tensors(model, model.stacks(), shape_only):
        # Norm scales near 1, everything else small: the forward then behaves like a trained model's.
        base = 1.0 if split_layer(key, model.stacks())[0] in norm_scales else 0.0
        tensors[key] = (base + std * rng.standard_normal(array.shape)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    hf_config.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    save_tiny_processor(path, model_type)
