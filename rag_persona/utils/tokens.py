"""Token ids every stage agrees on: which ids end generation for a model and its tokenizer."""

from __future__ import annotations


def generation_eos_ids(model) -> list[int]:
    """The ids the model's generation config stops on (an int, a list or None there), as a list."""
    ids = model.generation_config.eos_token_id
    return [int(i) for i in ids] if isinstance(ids, list | tuple) else ([int(ids)] if ids is not None else [])


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the generation config's EOS ids plus the tokenizer's EOS token."""
    ids = generation_eos_ids(model)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids
