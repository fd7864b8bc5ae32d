"""Several personas' build-data outputs as one training set (a role-play adapter learns any persona's register)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.prompts import PERSONA_FILE, PROMPT_TEMPLATE_VERSION, Persona
from rag_persona.settings import get_settings
from rag_persona.utils.io import atomic_folder, jsonl_text, read_jsonl, write_json
from training.provenance import file_sha256

from .build import DATA_FORMAT_VERSION, MANIFEST, MARKER, DataConfig, build_datasets

PARTS = "personas"  # each persona's own build-data output, kept inside the mixed folder for provenance


def expand_personas(values: list[str]) -> list[str]:
    """--persona values as persona ids/folders: a folder holding no persona.json but persona subfolders
    (knowledge/_synthetic) stands for all of them, in name order."""
    out: list[str] = []
    settings = get_settings()
    for value in values:
        folder = settings.persona_dir(value)
        if folder.is_dir() and not (folder / PERSONA_FILE).is_file():
            subs = sorted(p for p in folder.iterdir() if (p / PERSONA_FILE).is_file())
            if not subs:
                raise RagPersonaError(f"{folder}: neither a persona folder nor a folder of persona folders")
            out += [str(p) for p in subs]
        else:
            out.append(value)
    return out


def build_mixed(config: DataConfig, personas: list[str]) -> dict:
    """Build each persona's data (config with its persona and index), then write every file of the parts
    concatenated into config.out: train files shuffled (seeded) so batches mix personas, eval files and
    eval_prompts in persona order. Each row gains "persona" (its id); the manifest lists the parts'.
    """
    out = Path(config.out).absolute()
    if config.index is not None:
        raise RagPersonaError(
            "build-data: --index names one persona's index; leave it out with several personas"
        )
    with atomic_folder(out, marker=MARKER, what="build-data output") as work:
        parts = []
        for value in personas:
            persona = Persona.load(get_settings().persona_dir(value))
            if any(p["persona"] == persona.id for p in parts):
                raise RagPersonaError(f"build-data: persona id {persona.id!r} given twice ({value})")
            part_out = work / PARTS / persona.id
            manifest = build_datasets(dataclasses.replace(config, out=part_out, persona=value))
            parts.append({"persona": persona.id, "source": value, "folder": part_out, "manifest": manifest})
        files = _concatenate(work, parts, config.seed)
        manifest = {
            "format_version": DATA_FORMAT_VERSION,
            "prompt_template_version": PROMPT_TEMPLATE_VERSION,
            "seed": config.seed,
            "personas": [
                {
                    "persona": p["persona"],
                    "source": p["source"],
                    "folder": f"{PARTS}/{p['persona']}",
                    "knowledge_hash": p["manifest"]["knowledge_hash"],
                    "counts": p["manifest"]["counts"],
                }
                for p in parts
            ],
            "counts": {name: meta["rows"] for name, meta in files.items()},
            "files": files,
        }
        write_json(work / MANIFEST, manifest)
    return manifest


def _concatenate(work: Path, parts: list[dict], seed: int) -> dict:
    names = sorted({name for p in parts for name in p["manifest"]["files"]})
    files = {}
    for name in names:
        rows = []
        for p in parts:
            path = p["folder"] / name
            if path.is_file():
                rows += [_in_persona(row, p["persona"]) for _, row in read_jsonl(path)]
        if "_train" in name:
            random.Random(f"{seed}|{name}").shuffle(rows)
        path = work / name
        path.write_text(jsonl_text(rows), encoding="utf-8")
        files[name] = {"rows": len(rows), "sha256": file_sha256(path)}
    return files


def _in_persona(row: dict, persona: str) -> dict:
    """A part's row in the mixed set: its persona named, its id prefixed with it (two personas' dialogue
    files may use the same conversation ids, and on-policy replies and evaluation reports key on ids)."""
    out = {**row, "persona": persona}
    if "id" in row:
        out["id"] = f"{persona}/{row['id']}"
    return out
