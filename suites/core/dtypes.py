"""The one dtype vocabulary: canonical names are torch's (`float32`, `bfloat16`, `float16`); the short
forms `fp32`, `bf16`, `fp16` are accepted everywhere as input and never written to a record."""

from __future__ import annotations

CANONICAL = ("float32", "bfloat16", "float16")
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}


def canonical(name: str) -> str:
    """'bf16' -> 'bfloat16'; ValueError (one line) for anything that is not a training dtype."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in CANONICAL:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(CANONICAL)} (or {', '.join(ALIASES)})")
    return key


def torch_dtype(name: str):
    """The torch dtype of a name in the vocabulary."""
    import torch

    return getattr(torch, canonical(name))


def name_of(dtype) -> str:
    """The canonical name of a torch dtype (torch.bfloat16 -> 'bfloat16')."""
    return canonical(str(dtype).removeprefix("torch."))
