"""The recipe's LoRA for a model: which modules (all linear layers, embeddings, the head) in which layers."""

from __future__ import annotations

import re

from rag_persona.errors import RagPersonaError
from training.recipes import Recipe


def linear_module_names(model) -> list[str]:
    """Names (last component) of the linear layers inside the decoder blocks: 'all linear layers'."""
    import torch

    names = set()
    for full, module in model.named_modules():
        if ".layers." not in full and ".h." not in full:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(recipe: Recipe, model, *, task_type: str = "CAUSAL_LM", modules_to_save=None):
    """The recipe's LoRA for this model.

    target_modules is "all-linear" or a list of module names, where the list may hold "all-linear" (the
    decoder's linear layers) next to modules outside the decoder layers such as embed_tokens and lm_head.
    """
    from peft import LoraConfig

    lora = recipe.lora
    targets = lora.target_modules
    if isinstance(targets, list | tuple):
        targets = list(targets)
        if "all-linear" in targets:
            targets = sorted(set(linear_module_names(model)) | (set(targets) - {"all-linear"}))
    elif task_type != "CAUSAL_LM" and targets == "all-linear":
        # peft's "all-linear" keeps every Linear except the LM head; a classifier's score head is one of them,
        # and it is trained whole (modules_to_save) instead.
        targets = linear_module_names(model)
    layers = _chosen_layers(recipe, model)
    if layers is not None:
        if targets == "all-linear":
            targets = linear_module_names(model)
        outside = [t for t in targets if t not in set(linear_module_names(model))]
        if outside:
            # peft's layers_to_transform drops every module without a layer index (embed_tokens, lm_head),
            # so name each module in full instead: the chosen layers' ones and the outside ones.
            targets, layers = _full_target_names(model, targets, set(layers)), None
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def _chosen_layers(recipe: Recipe, model) -> list[int] | None:
    """The decoder layers the recipe's LoRA goes on (lora.top_layers or lora.layers); None: all of them."""
    lora = recipe.lora
    n = model.config.get_text_config().num_hidden_layers
    if lora.layers:
        outside = [i for i in lora.layers if not 0 <= i < n]
        if outside:
            raise RagPersonaError(
                f"recipe {recipe.name}: field 'lora.layers': layer {outside[0]} is not one of the "
                f"model's {n} decoder layers (0-{n - 1})"
            )
        return sorted(lora.layers)
    if lora.top_layers:
        return list(range(max(0, n - lora.top_layers), n))
    return None


def _full_target_names(model, targets: list[str], layers: set[int]) -> list[str]:
    wanted = set(targets)
    names = []
    for full, _ in model.named_modules():
        last = full.rsplit(".", 1)[-1]
        if last not in wanted and full not in wanted:
            continue
        m = re.search(r"\.(?:layers|h)\.(\d+)\.", full)
        if m is None or int(m.group(1)) in layers:
            names.append(full)
    return names
