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


def select_modules(module_names, target_modules, layers_to_transform=None, allow_none=False) -> list[str]:
    """The module names PEFT adapts for `target_modules`: a regex (fully matched), a list (exact or
    suffix after a dot), or "all-linear" (every Linear but lm_head). `allow_none`: no match is no error
    (other targets, e.g. target_parameters, are chosen)."""
    if target_modules == "all-linear":
        chosen = [n for n in module_names if n != "lm_head"]
    elif isinstance(target_modules, str):
        chosen = [n for n in module_names if re.fullmatch(target_modules, n)]
    else:
        targets = list(target_modules)
        chosen = [n for n in module_names if any(n == t or n.endswith("." + t) for t in targets)]
    chosen = _in_layers(chosen, layers_to_transform)
    if not chosen and allow_none:
        return []
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


def _in_layers(names, layers_to_transform):
    if layers_to_transform is None:
        return names
    layers = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
    return [n for n in names if (m := re.search(r"\.(\d+)\.", n)) and int(m.group(1)) in layers]


# Unsloth's MLP leaf names that ask for the experts' weights: gate / up / gate_up adapt `gate_up_proj`,
# down adapts `down_proj`.
MOE_MLP_TARGETS = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "gate_up_proj": "gate_up_proj",
                   "down_proj": "down_proj"}


def moe_target_parameters(param_names, target_modules=None, finetune_language_layers=True,
                          finetune_mlp_modules=True) -> list[str]:
    """Unsloth's automatic `target_parameters` for a mixture of experts' weights (`param_names`, per layer):
    with its default targets (None or "all-linear") every expert weight, when the language layers' MLPs
    are finetuned; with a list of leaf names, the expert weights of the MLP leaves it names (gate_proj /
    up_proj / gate_up_proj -> gate_up_proj, down_proj -> down_proj). Suffixes as PEFT matches them
    (`mlp.experts.gate_up_proj`); [] for a model without experts or a regex string (pass target_parameters).

    Unsloth (2026.10) also adapts the experts for finetune_language_layers=False when the vision MLPs are
    finetuned (its scoped regex still names an MLP); its own comment says the experts should drop out
    there, and here they do: the experts are language-model weights.
    """
    if not param_names or not (finetune_language_layers and finetune_mlp_modules):
        return []
    if target_modules is None or target_modules == "all-linear":
        wanted = set(MOE_MLP_TARGETS.values())
    elif isinstance(target_modules, str):
        return []
    else:
        wanted = {MOE_MLP_TARGETS[t] for t in target_modules if t in MOE_MLP_TARGETS}
    suffixes = []
    for name in param_names:
        suffix = re.sub(r"^.*?\.\d+\.", "", name)  # the name inside its layer: mlp.experts.gate_up_proj
        if suffix.rsplit(".", 1)[-1] in wanted and suffix not in suffixes:
            suffixes.append(suffix)
    return suffixes


def select_parameters(param_names, target_parameters, layers_to_transform=None) -> list[str]:
    """The parameter names PEFT adapts for `target_parameters` (each name equal to a target or ending in
    "." + target), in the layers of `layers_to_transform` (Unsloth's reading: PEFT itself ignores it there)."""
    if not target_parameters:
        return []
    if isinstance(target_parameters, str):
        raise ValueError(f"target_parameters={target_parameters!r}: expected a list of parameter names, "
                         f"e.g. ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']")
    chosen = [n for n in param_names if any(n == t or n.endswith("." + t) for t in target_parameters)]
    unmatched = [t for t in target_parameters if not any(n == t or n.endswith("." + t) for n in param_names)]
    if unmatched:
        leaves = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in param_names})
        raise ValueError(f"target_parameters {unmatched} match no expert weight of this model; it has "
                         f"{', '.join(leaves) or 'none (it is no mixture of experts)'}")
    chosen = _in_layers(chosen, layers_to_transform)
    if not chosen:
        raise ValueError(f"target_parameters={list(target_parameters)} match no expert weight in layers "
                         f"{layers_to_transform}")
    return chosen
