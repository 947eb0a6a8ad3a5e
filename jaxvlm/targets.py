"""Which Linear modules get LoRA: Unsloth's target regex and PEFT's target matching, on per-layer HF names.

Both work on transformers' module names (`model.language_model.layers.3.self_attn.q_proj`), which the
model's Linear layers give with their layers expanded (jaxvlm.lora.linear_modules), so the same
arguments pick the same modules here as in Unsloth and PEFT.
"""
from __future__ import annotations

import difflib
import re
from collections import Counter

VISION_TAGS = ("vision", "image", "visual", "patch")
LANGUAGE_TAGS = ("language", "text")
ATTENTION_TAGS = ("self_attn", "attention", "attn")
MLP_TAGS = ("mlp", "feed_forward", "ffn", "dense")


def get_peft_regex(module_names, finetune_vision_layers=True, finetune_language_layers=True,
                   finetune_attention_modules=True, finetune_mlp_modules=True, target_modules=None) -> str:
    """Unsloth's target regex (unsloth_zoo's get_peft_regex) for the given Linear module names.

    Candidates are the leaf names occurring more than once (so lm_head and the merger's one-off
    projections are left out) or `target_modules`; a name must contain a selected part tag (vision /
    language) and component tag (attention / mlp) before the leaf; `model.layers.N.<component>.<leaf>`
    also matches for older language-model naming; without any vision part, part tags are dropped.
    """
    if not finetune_vision_layers and not finetune_language_layers:
        raise ValueError("no layers to finetune: set finetune_vision_layers and/or finetune_language_layers")
    if not finetune_attention_modules and not finetune_mlp_modules:
        raise ValueError("no modules to finetune: set finetune_attention_modules and/or finetune_mlp_modules")
    counts = Counter(name.rsplit(".", 1)[-1] for name in module_names)
    leaves = [leaf for leaf, n in counts.items() if n > 1] if target_modules is None else list(target_modules)
    parts = (VISION_TAGS if finetune_vision_layers else ()) + (LANGUAGE_TAGS if finetune_language_layers else ())
    components = (ATTENTION_TAGS if finetune_attention_modules else ()) + (MLP_TAGS if finetune_mlp_modules else ())
    leaf = "(?:" + "|".join(re.escape(x) for x in leaves) + ")"
    comp = "|".join(components)
    regex = r".*?(?:" + "|".join(parts) + r").*?(?:" + comp + r").*?" + leaf
    if finetune_language_layers:
        regex = r"(?:" + regex + r")|(?:\bmodel\.layers\.[\d]{1,}\.(?:" + comp + r")\.(?:" + leaf + r"))"
    if not any(re.fullmatch(regex, n) for n in module_names):
        regex = r".*?(?:" + comp + r").*?" + leaf
    if not any(re.fullmatch(regex, n) for n in module_names):
        raise ValueError(f"no Linear module matches target_modules={target_modules!r}"
                         if target_modules is not None else "no Linear module matches Unsloth's target regex")
    return regex


def select_modules(module_names, target_modules, layers_to_transform=None) -> list[str]:
    """The module names PEFT adapts for `target_modules`: a regex (fully matched), a list (exact or
    suffix after a dot), or "all-linear" (every Linear but lm_head)."""
    if target_modules == "all-linear":
        chosen = [n for n in module_names if n != "lm_head"]
    elif isinstance(target_modules, str):
        chosen = [n for n in module_names if re.fullmatch(target_modules, n)]
    else:
        targets = list(target_modules)
        chosen = [n for n in module_names if any(n == t or n.endswith("." + t) for t in targets)]
    if layers_to_transform is not None:
        layers = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        chosen = [n for n in chosen if (m := re.search(r"\.(\d+)\.", n)) and int(m.group(1)) in layers]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        close = sorted({c for t in wanted for c in difflib.get_close_matches(str(t), leaves, n=5, cutoff=0.3)})
        hint = ""
        if isinstance(target_modules, str) and target_modules != "all-linear":
            example = next(iter(module_names), "model.layers.0.self_attn.q_proj")
            hint = (f"; a string is a regex matched against the whole module name (PEFT's rule), e.g. "
                    f"{example!r}: to pick modules by name pass a list, target_modules=[{target_modules!r}]")
        raise ValueError(f"target_modules={target_modules!r} matches no Linear module"
                         f"{'' if layers_to_transform is None else f' in layers {layers_to_transform}'}; "
                         f"close module names: {', '.join(close) or '-'}; all: {', '.join(leaves)}{hint}")
    return chosen
