"""Model and adapter folders as merge inputs and outputs: configs, weight files, lazy safetensors, shards."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import read_json, write_json
from training.provenance import file_sha256

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_SHARD_BYTES = 2_000_000_000
# Files of a model folder that are weights (never copied from the base) or markers of a prepared bundled model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_SKIP_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "rag_persona_model.json")


# -- inputs ---------------------------------------------------------------------------------------------


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise RagPersonaError(f"{path}: not an adapter folder (no {ADAPTER_CONFIG})")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise RagPersonaError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise RagPersonaError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    with open_safetensors(path / ADAPTER_WEIGHTS):  # its header, now: peft would fail after the base load
        pass
    return cfg


@contextmanager
def open_safetensors(path: Path):
    """safetensors' safe_open; a file that is not one (truncated, another format) is one error line."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise RagPersonaError(f"{path}: not a readable safetensors file ({exc})") from None
    with handle:
        yield handle


def check_input_folders(paths: Sequence[Path], command: str) -> None:
    """Each input is an existing folder, none given twice (through symlinks and `..`)."""
    seen: set[Path] = set()
    for p in paths:
        if not p.is_dir():
            raise RagPersonaError(f"{p}: no such folder")
        if p.resolve() in seen:
            raise RagPersonaError(f"{command}: {p} is given twice")
        seen.add(p.resolve())


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files holding a model's (or an adapter's) weights, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RagPersonaError(f"{folder}: no such folder")
    if is_adapter_dir(folder):
        read_adapter_config(folder)
        return [folder / ADAPTER_WEIGHTS]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RagPersonaError(f"{index}: field 'weight_map': expected a mapping of tensor → shard file")
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise RagPersonaError(f"{index}: names shard {missing[0]}, which is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RagPersonaError(f"{folder}: no safetensors weights (model.safetensors or an index)")
    return files


def input_record(path: str | Path, role: str, label: str | None = None) -> dict:
    path = Path(path)
    record = {"role": role, "path": str(path)}
    if label and label != str(path):
        record["name"] = label
    record["weights_sha256"] = {f.name: file_sha256(f) for f in weight_files(path)}
    return record


def canonical_base(name: str | None) -> str | None:
    """A comparable name for a base model: the bundled alias for its prepared folder, else a resolved path."""
    if not name:
        return None
    from rag_persona.generation import BUNDLED

    p = Path(name)
    if name in BUNDLED or p.name in BUNDLED:
        return p.name
    return str(p.resolve()) if p.exists() else name


def resolve_base(name: str | None, progress: Callable[[str], None] = lambda m: None) -> tuple[str, Path]:
    """(label, local folder) of a base model: a bundled alias (prepared once), a local folder, or the default."""
    from rag_persona.generation import resolve_model_path
    from rag_persona.settings import get_settings

    label = name or get_settings().chat_model
    path = Path(resolve_model_path(label, progress=progress))
    if not path.is_dir():
        raise RagPersonaError(f"base model {label!r}: not a bundled alias or local model folder")
    weight_files(path)
    return label, path


def adapters_base(adapters: Sequence[Path]) -> str | None:
    """The base all adapters were trained on (as recorded); different bases are an error."""
    seen: dict[str, Path] = {}
    raw = None
    for a in adapters:
        recorded = read_adapter_config(a).get("base_model_name_or_path")
        key = canonical_base(recorded)
        if key is not None:
            seen.setdefault(key, a)
            raw = raw or recorded
    if len(seen) > 1:
        (k1, a1), (k2, a2) = list(seen.items())[:2]
        raise RagPersonaError(f"adapters have different bases: {a1} was trained on {k1}, {a2} on {k2}")
    return raw


def default_adapter_base(adapters: Sequence[Path], base: str | None) -> str | None:
    """--model if given, else the adapters' recorded base when it resolves here, else None (the default)."""
    recorded = adapters_base(adapters)
    if base:
        return base
    if recorded:
        from rag_persona.generation import BUNDLED

        if recorded in BUNDLED or Path(recorded).name in BUNDLED:
            return Path(recorded).name
        if Path(recorded).is_dir():
            return recorded
    return None


# -- reading and writing safetensors folders ----------------------------------------------------------------


@dataclass
class SafetensorsFolder:
    """Lazy read access to every tensor of a (possibly sharded) safetensors model folder."""

    path: Path
    _handles: dict = field(default_factory=dict)
    _where: dict = field(default_factory=dict)

    @contextmanager
    def opened(self) -> Iterator[SafetensorsFolder]:
        with ExitStack() as stack:
            for f in weight_files(self.path):
                handle = stack.enter_context(open_safetensors(f))
                self._handles[f.name] = handle
                for key in handle.keys():
                    self._where[key] = f.name
            try:
                yield self
            finally:
                self._handles.clear()
                self._where.clear()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str):
        return self._handles[self._where[key]].get_tensor(key)


@dataclass
class ShardWriter:
    """Collect tensors into shards of at most max_bytes and write them as HF-style sharded safetensors."""

    folder: Path
    max_bytes: int = DEFAULT_SHARD_BYTES
    _pending: dict = field(default_factory=dict)
    _pending_bytes: int = 0
    _shards: list = field(default_factory=list)
    _total: int = 0

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self._total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f".shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
        self._shards.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            (self.folder / self._shards[0][0]).rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        n = len(self._shards)
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self._shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp).rename(self.folder / final)
            names.append(final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        write_json(self.folder / "model.safetensors.index.json", index)
        return names


def copy_model_files(base: Path, dest: Path) -> list[str]:
    """Config, generation config and tokenizer files of the base: every top-level file that is not weights."""
    copied = []
    for f in sorted(base.iterdir()):
        if not f.is_file() or f.name in _SKIP_FILES or f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, dest / f.name)
        copied.append(f.name)
    return copied


def load_base_model(base_path: Path, device: str = "cpu"):
    """The base as stored (dtype auto), with trust_remote_code off; merges stay in the stored precision."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(base_path), dtype="auto", trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise RagPersonaError(f"base model {base_path}: cannot load ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()
