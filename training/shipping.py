"""Ship a trained adapter into the repo: bf16 weights, its provenance and lineage, a manifest for the chat."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import atomic_folder, read_json, write_json
from training.provenance import file_sha256
from training.stages.records import PROVENANCE

ADAPTER_MANIFEST = "rag_persona_adapter.json"


def _copy_provenance(src: Path, dest: Path) -> None:
    for name in PROVENANCE:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)


def _ancestors(run: Path, metrics: dict) -> list[tuple[Path, dict]]:
    """(folder, metrics) of each earlier stage this run continued (init_adapter), nearest first."""
    chain, seen = [], {run.resolve()}
    ancestor = metrics.get("init_adapter")
    while ancestor and (Path(ancestor) / "metrics.json").is_file():
        folder = Path(ancestor)
        if folder.resolve() in seen:
            raise RagPersonaError(f"{folder / 'metrics.json'}: field 'init_adapter' loops back to {ancestor}")
        seen.add(folder.resolve())
        a_metrics = read_json(folder / "metrics.json")
        chain.append((folder, a_metrics))
        ancestor = a_metrics.get("init_adapter")
    return chain


def _copy_lineage(ancestors: list[tuple[Path, dict]], work: Path) -> None:
    """Earlier stages (the SFT a DPO run continued) keep their own recipe, data manifest and curve."""
    for ancestor, a_metrics in ancestors:
        name = f"{a_metrics.get('stage')}-{a_metrics.get('recipe')}"
        folder, n = work / "lineage" / name, 1
        while folder.exists():  # two rounds of one recipe (on-policy DPO) each keep their files
            n += 1
            folder = work / "lineage" / f"{name}-{n}"
        folder.mkdir(parents=True)
        _copy_provenance(ancestor, folder)


def _chain(metrics: dict):
    """This run's metrics, then those of the run it continued, and so on."""
    m = metrics
    while m:
        yield m
        m = (m.get("lineage") or {}).get("metrics")


def _write_gguf_lora(folder: Path, base_model: str) -> str | None:
    """The llama.cpp copy of the adapter (adapter.gguf) when its base is a bundled GGUF model."""
    from rag_persona.generation.gguf_lora import GGUF_LORA_FILE, write_gguf_lora
    from rag_persona.generation.llamacpp import GGUF_FILE, prepare_gguf
    from rag_persona.generation.models import BUNDLED

    if base_model not in BUNDLED:
        return None  # a hub/local HF base: llama.cpp users convert the base themselves
    write_gguf_lora(folder, prepare_gguf(base_model) / GGUF_FILE, folder / GGUF_LORA_FILE)
    return GGUF_LORA_FILE


def ship_adapter(
    run: str | Path,
    dest: str | Path,
    *,
    default: bool = True,
    bf16: bool = True,
    extra: dict | None = None,
) -> Path:
    """Copy a trained adapter into the repo (bf16 weights, provenance, rag_persona_adapter.json).

    The chat picks up a shipped adapter marked default for its base model and persona
    (rag_persona.evaluation.evaluate.default_adapter).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    run, dest = Path(run), Path(dest)
    if not (run / "adapter_config.json").is_file():
        raise RagPersonaError(f"{run}: not an adapter folder (no adapter_config.json)")
    metrics = read_json(run / "metrics.json", missing="no such file: not a training run's output folder")
    if not isinstance(metrics.get("base_model"), str):
        raise RagPersonaError(f"{run / 'metrics.json'}: field 'base_model': missing (not a training run's)")
    # Everything read before the folder is made: a bad input never leaves a half-shipped adapter behind.
    weights = run / "adapter_model.safetensors"
    if not weights.is_file():
        raise RagPersonaError(f"{weights}: no such file (the run saved no adapter weights)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise RagPersonaError(f"{weights}: not a readable safetensors file ({exc})") from None
    config = read_json(run / "adapter_config.json")
    ancestors = _ancestors(run, metrics)
    siblings = _sibling_manifests(dest) if default else []  # only a new default changes them
    with atomic_folder(dest, marker=ADAPTER_MANIFEST, what="a shipped adapter") as work:
        _copy_provenance(run, work)
        _copy_lineage(ancestors, work)
        config["base_model_name_or_path"] = metrics["base_model"]  # the alias, not this machine's cache path
        (work / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if bf16:
            tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
        save_file(tensors, str(work / "adapter_model.safetensors"), metadata={"format": "pt"})
        gguf_lora = _write_gguf_lora(work, metrics["base_model"])
        info = {
            "name": dest.name,
            "base_model": metrics["base_model"],
            "persona": metrics.get("persona", "ojousama"),
            "default": default,
            "stages": [f"{m.get('stage')}:{m.get('recipe')}" for m in reversed(list(_chain(metrics)))],
            "weights_dtype": "bfloat16" if bf16 else "as trained",
            "adapter_sha256": file_sha256(work / "adapter_model.safetensors"),
            "trained_seconds": round(sum(float(m.get("seconds", 0)) for m in _chain(metrics)), 1),
            "gguf_lora": gguf_lora,
            **(extra or {}),
        }
        write_json(work / ADAPTER_MANIFEST, info, indent=1)
    if default:
        _demote_other_defaults(siblings, info)
    return dest


def _sibling_manifests(dest: Path) -> list[tuple[Path, dict]]:
    """The other shipped adapters' manifests beside dest, each read (a malformed one is one error line)."""
    return [
        (manifest, read_json(manifest))
        for manifest in sorted(dest.parent.glob(f"*/{ADAPTER_MANIFEST}"))
        if manifest.parent.resolve() != dest.absolute().resolve()
    ]


def _demote_other_defaults(siblings: list[tuple[Path, dict]], info: dict) -> None:
    """One default per base model and persona: the shipped siblings that were the default for this adapter's
    model and persona stop being it (they stay one --adapter away)."""
    for manifest, other in siblings:
        same = (other.get("base_model"), other.get("persona")) == (info["base_model"], info["persona"])
        if same and other.get("default"):
            write_json(manifest, {**other, "default": False}, indent=1)
