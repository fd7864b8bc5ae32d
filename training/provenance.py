"""What every training output records about its origin: file hashes and library versions."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 16 MiB chunks (model weights do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions(*extra: str) -> dict:
    """Versions of torch, transformers and peft (plus the named extra modules, e.g. "trl") and of Python."""
    import importlib

    out = {}
    for name in ("torch", "transformers", *extra, "peft"):
        out[name] = importlib.import_module(name).__version__
    out["python"] = sys.version.split()[0]
    return out
