"""What every training output records about its origin: file hashes and library versions."""

from __future__ import annotations

import sys

from rag_persona.utils.io import file_sha256

__all__ = ["file_sha256", "versions"]


def versions(*extra: str) -> dict:
    """Versions of torch, transformers and peft (plus the named extra modules, e.g. "trl") and of Python."""
    import importlib

    out = {}
    for name in ("torch", "transformers", *extra, "peft"):
        out[name] = importlib.import_module(name).__version__
    out["python"] = sys.version.split()[0]
    return out
