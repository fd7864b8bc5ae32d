"""Fact encodings for cross-attention memory: cached inside the index folder, packed per batch as `Memory`.

``<index>/xattn/<model-fingerprint[:16]>-<encoder-key[:8]>.safetensors`` holds one tensor per fact id
(the frozen base model's hidden states of the fact at each cross-attention layer) plus metadata: the
full model fingerprint, the encoder config, the knowledge hash and a sha256 per fact text. An entry is
reused only when model, encoder config and fact text all match; edited or new facts are encoded and
the file is rewritten atomically (`rag_persona.utils.io`), so readers never see half a file.
The encodings do not depend on the trained cross-attention weights: retraining keeps the cache valid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rag_persona.errors import RagPersonaError
from rag_persona.utils.hardware import dtype_name
from rag_persona.utils.io import write_file_atomic

CACHE_DIR = "xattn"
CACHE_FORMAT = "1"


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encoder_key_hash(xmodel) -> str:
    return hashlib.sha256(json.dumps(xmodel.config.encoder_key(), sort_keys=True).encode()).hexdigest()


def cache_path(index_dir: str | Path, xmodel) -> Path:
    """One cache file per base, encoder and compute dtype (a float32 base fingerprints as its bf16 file does,
    but encodes facts to other values)."""
    name = f"{xmodel.fingerprint[:16]}-{encoder_key_hash(xmodel)[:8]}-{dtype_name(xmodel.dtype)}.safetensors"
    return Path(index_dir) / CACHE_DIR / name


@dataclass
class FactEncodings:
    """Encodings by fact id, each valid for the text it was computed from."""

    by_id: dict[str, torch.Tensor] = field(default_factory=dict)
    text_sha: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    computed: int = 0  # how many were encoded (not read from the cache) when this was built
    seconds: float = 0.0

    def get(self, fact_id: str, text: str) -> torch.Tensor | None:
        if self.text_sha.get(fact_id) == text_sha(text):
            return self.by_id.get(fact_id)
        return None

    def put(self, fact_id: str, text: str, encoding: torch.Tensor) -> None:
        self.by_id[fact_id] = encoding
        self.text_sha[fact_id] = text_sha(text)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.by_id.values())


@dataclass
class Memory:
    """Memory for one batch: per item, the concatenated encodings of its facts.

    states: (B, S, M, D) – S = one slice per cross-attention layer ("hidden") or 1 shared slice ("e5");
    mask: (B, M) bool, True where a memory token is real.
    start: positions before it never see the memory. Chat and training use the end of the system turn: as
    in prompt mode, where the instruction precedes the context block, its tokens (and their KV cache) do
    not depend on the facts. None means "after the system turn", resolved by `XattnReplyStream` from the
    prompt (a plain forward treats None as 0).
    """

    states: object
    mask: object
    fact_ids: list[list[str]] = field(default_factory=list)
    start: int | None = None

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def empty(self) -> bool:
        return self.mask.numel() == 0 or not bool(self.mask.any())


def read_cache(path: Path, xmodel) -> FactEncodings:
    """The usable part of a cache file: empty when missing, unreadable, or made for another model/encoder."""
    from safetensors import safe_open

    if not path.is_file():
        return FactEncodings(path=path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (
                meta.get("format") != CACHE_FORMAT
                or meta.get("fingerprint") != xmodel.fingerprint
                or json.loads(meta.get("encoder", "null")) != xmodel.config.encoder_key()
            ):
                return FactEncodings(path=path)
            shas = json.loads(meta.get("text_sha", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
        return FactEncodings(path=path)
    return FactEncodings(by_id=tensors, text_sha={k: v for k, v in shas.items() if k in tensors}, path=path)


def write_cache(encodings: FactEncodings, xmodel, knowledge_hash: str | None = None) -> Path:
    from safetensors.torch import save_file

    path = encodings.path
    if path is None:
        raise RagPersonaError("xattn cache: no path to write to")
    meta = {
        "format": CACHE_FORMAT,
        "fingerprint": xmodel.fingerprint,
        "base": xmodel.config.base,
        "encoder": json.dumps(xmodel.config.encoder_key(), sort_keys=True),
        "knowledge_hash": knowledge_hash or "",
        "text_sha": json.dumps(encodings.text_sha, sort_keys=True),
    }
    tensors = {k: v.contiguous() for k, v in encodings.by_id.items()}
    return write_file_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_or_build_encodings(
    xmodel,
    tokenizer,
    facts: Sequence,
    index_dir: str | Path | None,
    *,
    knowledge_hash: str | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> FactEncodings:
    """Encodings for every fact (objects with .id and .text): from the cache where valid, else encoded.

    With an index folder the cache is rewritten (atomically) when anything was encoded or dropped.
    """
    import time

    path = cache_path(index_dir, xmodel) if index_dir else None
    cached = read_cache(path, xmodel) if path else FactEncodings()
    out = FactEncodings(path=path)
    todo = []
    for f in facts:
        hit = cached.get(f.id, f.text)
        if hit is None:
            todo.append(f)
        else:
            out.put(f.id, f.text, hit)
    started = time.perf_counter()
    if todo:
        progress(f"encoding {len(todo)} facts for cross-attention memory (cached afterwards)")
        for f, enc in zip(todo, xmodel.encode_facts(tokenizer, [f.text for f in todo]), strict=True):
            out.put(f.id, f.text, enc)
    out.computed, out.seconds = len(todo), time.perf_counter() - started
    if path is not None and (todo or set(cached.by_id) != set(out.by_id)):
        write_cache(out, xmodel, knowledge_hash)
    return out


def encodings_for(xmodel, tokenizer, facts: Sequence, encodings: FactEncodings | None) -> list[torch.Tensor]:
    """Encodings of these facts in order: cached ones as they are, unknown or edited ones encoded now."""
    result: list[torch.Tensor | None] = []
    missing = []
    for i, f in enumerate(facts):
        hit = encodings.get(f.id, f.text) if encodings is not None else None
        result.append(hit)
        if hit is None:
            missing.append(i)
    if missing:
        fresh = xmodel.encode_facts(tokenizer, [facts[i].text for i in missing])
        for i, enc in zip(missing, fresh, strict=True):
            result[i] = enc
            if encodings is not None:
                encodings.put(facts[i].id, facts[i].text, enc)
    return result  # type: ignore[return-value]
