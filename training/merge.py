"""Merge LoRA adapters (peft add_weighted_adapter) or full models (streamed, tensor by tensor) with a manifest.

Two kinds of merge, picked by the inputs:

* **Adapters** (every input folder holds an `adapter_config.json`): the adapters are loaded onto one base
  and combined by peft's `PeftModel.add_weighted_adapter` (`linear`, `cat`, `svd`, `ties`, `dare_linear`,
  `dare_ties`, `magnitude_prune` and their `_svd` variants). The result is a new adapter folder, or with
  `full=True` the base with the merged adapter folded in, saved as a standalone model folder.
  Note peft's `linear` combines A and B separately (A' = Σ √(wᵢsᵢ)·Aᵢ, B' = Σ √(wᵢsᵢ)·Bᵢ, scaling 1), so
  its ΔW = B'A' carries cross terms; `cat` gives exactly Σ wᵢ·sᵢ·BᵢAᵢ at the sum of the ranks.
* **Models** (full fine-tuned model folders, against a base): every tensor is read from safetensors one at a
  time per model and combined with `peft.utils.merge_utils`:
  `linear` = Σ wᵢθᵢ / Σ wᵢ; `task_arithmetic` = θ₀ + Σ wᵢ(θᵢ − θ₀); `ties`, `dare_linear`, `dare_ties`,
  `magnitude_prune` = θ₀ + merge_utils.<method>(θᵢ − θ₀, w, density). An adapter folder among the models is
  first folded into the base (in a temporary folder next to the output).

Every output holds `merge_manifest.json` (method, inputs with the sha256 of their weight files, weights,
density, seed, library versions) and appears only complete: it is built in a hidden folder beside the
destination and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from training.trainers import _ensure_parent, _write_atomic

MANIFEST = "merge_manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

LORA_METHODS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# peft stacks A and B tensors for these, so every adapter must have the same rank.
EQUAL_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
MODEL_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DEFAULT_SHARD_BYTES = 2_000_000_000
# Files of a model folder that are weights (never copied from the base) or markers of a prepared bundled model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_SKIP_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "rag_persona_model.json")


def needs_density(method: str) -> bool:
    return any(tag in method for tag in ("ties", "dare", "magnitude_prune"))


# -- inputs ---------------------------------------------------------------------------------------------


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise RagPersonaError(f"{path}: not an adapter folder (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RagPersonaError(f"{cfg_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise RagPersonaError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise RagPersonaError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    return cfg


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
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise RagPersonaError(f"{index}: names shard {missing[0]}, which is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RagPersonaError(f"{folder}: no safetensors weights (model.safetensors or an index)")
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def check_weights(weights: Sequence[float] | None, n: int, what: str = "inputs") -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0 / n] * n
    if len(weights) != n:
        raise RagPersonaError(f"--weights: {len(weights)} weights given for {n} {what}")
    if not all(math.isfinite(w) for w in weights):
        raise RagPersonaError(f"--weights: {list(weights)} has a non-finite value")
    return [float(w) for w in weights]


def check_density(method: str, density: float | None) -> float | None:
    if not needs_density(method):
        return None
    if density is None:
        raise RagPersonaError(f"--density: method {method} needs a density (share of entries kept, 0–1]")
    if not 0.0 < density <= 1.0:
        raise RagPersonaError(f"--density: {density} is outside (0, 1]")
    return float(density)


def _check_inputs(inputs: Sequence[str | Path], need_two: bool = True) -> list[Path]:
    paths = [Path(p) for p in inputs]
    if need_two and len(paths) < 2:
        raise RagPersonaError(f"merge: needs at least two inputs, got {len(paths)}")
    for p in paths:
        if not p.is_dir():
            raise RagPersonaError(f"{p}: no such folder")
    return paths


# -- reading and writing safetensors folders ----------------------------------------------------------------


@dataclass
class SafetensorsFolder:
    """Lazy read access to every tensor of a (possibly sharded) safetensors model folder."""

    path: Path
    _handles: dict = field(default_factory=dict)
    _where: dict = field(default_factory=dict)

    @contextmanager
    def opened(self) -> Iterator[SafetensorsFolder]:
        from safetensors import safe_open

        with ExitStack() as stack:
            for f in weight_files(self.path):
                handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
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
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
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


def _versions() -> dict:
    import peft
    import safetensors
    import torch
    import transformers

    return {
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def _write_manifest(work: Path, manifest: dict) -> None:
    (work / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A hidden work folder beside out, renamed to out only when the block finishes without error."""
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=_ensure_parent(out)))
    try:
        yield work
        _write_atomic(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a hidden file beside path, then rename it into place."""
    path = Path(path)
    _ensure_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    tmp = Path(tmp)
    try:
        os.close(fd)
        write(tmp)
        tmp.chmod(0o644)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- LoRA adapters on one base ------------------------------------------------------------------------------


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


def check_adapters(adapters: Sequence[Path], method: str) -> list[dict]:
    """Configs of the adapters; refuse what peft would merge wrongly or fail on deep inside."""
    configs = [read_adapter_config(a) for a in adapters]
    adapters_base(adapters)
    if method not in LORA_METHODS:
        raise RagPersonaError(f"--method: {method!r} is not an adapter merge ({', '.join(LORA_METHODS)})")
    if method in EQUAL_RANK_METHODS:
        ranks = {}
        for a, c in zip(adapters, configs, strict=True):
            r = max([c.get("r", 8), *(c.get("rank_pattern") or {}).values()])
            ranks.setdefault(r, a)
        if len(ranks) > 1:
            (r1, a1), (r2, a2) = list(ranks.items())[:2]
            raise RagPersonaError(
                f"--method {method}: needs adapters of equal rank, but {a1} has r={r1} and {a2} r={r2} "
                "(use cat or svd)"
            )
    # The merged adapter copies the first adapter's layer selection, so differing selections would drop layers.
    layers = {json.dumps(c.get("layers_to_transform")): a for a, c in zip(adapters, configs, strict=True)}
    if len(layers) > 1:
        (l1, a1), (l2, a2) = list(layers.items())[:2]
        raise RagPersonaError(f"adapters adapt different layers: {a1} {l1}, {a2} {l2}")
    for a, c in zip(adapters, configs, strict=True):
        if c.get("use_dora"):
            raise RagPersonaError(f"{a}: DoRA adapters cannot be merged by add_weighted_adapter")
    return configs


def attach_adapters(model, adapters: Sequence[Path]):
    """A PeftModel with each adapter loaded under the names a0, a1, …"""
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = None
    for name, path in zip(names, adapters, strict=True):
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            else:
                peft_model.load_adapter(str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RagPersonaError(f"{path}: does not fit the base model ({first[:200]})") from None
    return peft_model, names


def add_merged_adapter(
    peft_model,
    names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    method: str,
    density: float | None,
    seed: int,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
) -> None:
    import torch

    # dare_* draws its masks from torch's global generator: seed it so a merge can be rebuilt exactly.
    torch.manual_seed(seed)
    try:
        peft_model.add_weighted_adapter(
            list(names),
            [float(w) for w in weights],
            new_name,
            combination_type=method,
            density=density,
            svd_rank=svd_rank,
            majority_sign_method=majority_sign_method,
        )
    except ValueError as exc:
        raise RagPersonaError(f"merge --method {method}: {exc}") from None


def export_adapter(peft_model, adapter_name: str, dest: Path, base_label: str) -> None:
    """Write one adapter of a PeftModel as a standalone adapter folder (config + safetensors)."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(dest / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.base_model_name_or_path = base_label
    config.inference_mode = True
    config.save_pretrained(str(dest))


@dataclass
class MergeResult:
    out: Path
    manifest: dict

    def to_dict(self) -> dict:
        return {"out": str(self.out), **self.manifest}


def merge_adapters(
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    base: str | None = None,
    full: bool = False,
    seed: int = 0,
    svd_rank: int | None = None,
    majority_sign_method: str = "total",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] = lambda m: None,
) -> MergeResult:
    """Combine LoRA adapters with peft add_weighted_adapter; write an adapter folder, or a full model."""
    started = time.time()
    adapters = _check_inputs(adapters)
    out = Path(out)
    check_adapters(adapters, method)
    weights = check_weights(weights, len(adapters), "adapters")
    density = check_density(method, density)
    base_label, base_path = resolve_base(default_adapter_base(adapters, base), progress)
    progress(f"merging {len(adapters)} adapters on {base_label} with {method}")
    model = load_base_model(base_path)
    peft_model, names = attach_adapters(model, adapters)
    add_merged_adapter(
        peft_model, names, weights, "merged", method, density, seed, svd_rank, majority_sign_method
    )
    manifest = {
        "kind": "adapter-merge",
        "output": "model" if full else "adapter",
        "method": method,
        "weights": weights,
        "density": density,
        "seed": seed,
        "svd_rank": svd_rank,
        "majority_sign_method": majority_sign_method if "ties" in method else None,
        "base": input_record(base_path, "base", base_label),
        "inputs": [input_record(a, "adapter") for a in adapters],
        "versions": _versions(),
    }
    with atomic_folder(out) as work:
        if full:
            peft_model.set_adapter("merged")
            merged = peft_model.merge_and_unload(adapter_names=["merged"])
            copy_model_files(base_path, work)
            merged.save_pretrained(str(work), safe_serialization=True, max_shard_size=shard_bytes)
        else:
            export_adapter(peft_model, "merged", work, base_label)
        manifest["seconds"] = round(time.time() - started, 1)
        _write_manifest(work, manifest)
    progress(f"wrote {out}")
    return MergeResult(out, manifest)


# -- full models, tensor by tensor --------------------------------------------------------------------------


def materialize_adapter(adapter: Path, base_path: Path, dest: Path) -> Path:
    """Fold an adapter into the base and save it as a model folder (so it can be merged as a model)."""
    from peft import PeftModel

    recorded = canonical_base(read_adapter_config(adapter).get("base_model_name_or_path"))
    model = load_base_model(base_path)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RagPersonaError(
            f"{adapter}: does not fit base {base_path} (trained on {recorded}; {str(exc).splitlines()[0][:160]})"
        ) from None
    merged.save_pretrained(str(dest), safe_serialization=True)
    return dest


def merge_tensors(method: str, base, tensors: list, weights, density: float | None):
    """One merged tensor in float32 from the base tensor and the fine-tuned ones (peft merge_utils)."""
    from peft.utils import merge_utils

    if method == "linear":
        total = float(weights.sum())
        return merge_utils.task_arithmetic([t.float() for t in tensors], weights / total)
    base32 = base.float()
    deltas = [t.float() - base32 for t in tensors]
    if method == "task_arithmetic":
        return base32 + merge_utils.task_arithmetic(deltas, weights)
    if method in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        return base32 + getattr(merge_utils, method)(deltas, weights, density)
    raise RagPersonaError(f"--method: {method!r} is not a model merge ({', '.join(MODEL_METHODS)})")


def merge_models(
    models: Sequence[str | Path],
    out: str | Path,
    *,
    base: str | None = None,
    method: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] = lambda m: None,
) -> MergeResult:
    """Merge full fine-tuned model folders against a base, one tensor per model in memory at a time."""
    import torch

    started = time.time()
    models = _check_inputs(models)
    out = Path(out)
    if method not in MODEL_METHODS:
        raise RagPersonaError(f"--method: {method!r} is not a model merge ({', '.join(MODEL_METHODS)})")
    weights = check_weights(weights, len(models), "models")
    if method == "linear" and abs(sum(weights)) < 1e-12:
        raise RagPersonaError(f"--weights: {weights} sum to 0; linear divides by their sum")
    density = check_density(method, density)
    base_label, base_path = resolve_base(base, progress)
    records = [input_record(m, "adapter" if is_adapter_dir(m) else "model") for m in models]
    manifest = {
        "kind": "model-merge",
        "output": "model",
        "method": method,
        "weights": weights,
        "density": density,
        "seed": seed,
        "base": input_record(base_path, "base", base_label),
        "inputs": records,
        "versions": _versions(),
    }
    w = torch.tensor(weights, dtype=torch.float32)
    with atomic_folder(out) as work, ExitStack() as stack:
        folders = []
        for m in models:
            if is_adapter_dir(m):
                progress(f"folding adapter {m} into the base first")
                tmp = Path(tempfile.mkdtemp(prefix=f".{m.name}.folded-", dir=work.parent))
                stack.callback(shutil.rmtree, tmp, True)
                folders.append(materialize_adapter(m, base_path, tmp))
            else:
                folders.append(m)
        base_st = stack.enter_context(SafetensorsFolder(base_path).opened())
        readers = [stack.enter_context(SafetensorsFolder(f).opened()) for f in folders]
        keys = base_st.keys()
        for m, r in zip(models, readers, strict=True):
            extra = sorted(set(r.keys()) - set(keys))
            missing = [k for k in keys if k not in r]
            if extra or missing:
                what = f"has tensor {extra[0]} that the base lacks" if extra else f"lacks tensor {missing[0]}"
                raise RagPersonaError(f"{m}: {what} (different architecture from base {base_label})")
        torch.manual_seed(seed)
        writer = ShardWriter(work, shard_bytes)
        for i, key in enumerate(keys, 1):
            b = base_st.get(key)
            for m, r in zip(models, readers, strict=True):
                if r.shape(key) != tuple(b.shape):
                    raise RagPersonaError(
                        f"{m}: tensor {key} has shape {r.shape(key)}, the base {tuple(b.shape)}"
                    )
            if not b.is_floating_point():
                writer.add(key, b)
                continue
            merged = merge_tensors(method, b, [r.get(key) for r in readers], w, density)
            writer.add(key, merged.to(b.dtype))
            if i % 50 == 0:
                progress(f"{i}/{len(keys)} tensors")
        files = writer.close()
        copy_model_files(base_path, work)
        manifest["files"] = files
        manifest["seconds"] = round(time.time() - started, 1)
        _write_manifest(work, manifest)
    progress(f"wrote {out}")
    return MergeResult(out, manifest)


def merge(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    base: str | None = None,
    full: bool = False,
    seed: int = 0,
    svd_rank: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str], None] = lambda m: None,
) -> MergeResult:
    """Adapters only → peft adapter merge; any full model among the inputs → streamed model merge."""
    paths = _check_inputs(inputs)
    if all(is_adapter_dir(p) for p in paths):
        return merge_adapters(
            paths,
            out,
            method=method,
            weights=weights,
            density=density,
            base=base,
            full=full,
            seed=seed,
            svd_rank=svd_rank,
            shard_bytes=shard_bytes,
            progress=progress,
        )
    if svd_rank is not None:
        raise RagPersonaError("--svd-rank: only adapter merges use it")
    return merge_models(
        paths,
        out,
        base=base,
        method=method,
        weights=weights,
        density=density,
        seed=seed,
        shard_bytes=shard_bytes,
        progress=progress,
    )


def parse_floats(text: str | None, what: str) -> list[float] | None:
    """'0.7,0.3' or '0.7 0.3' → [0.7, 0.3]; a one-line error naming the option otherwise."""
    if text is None or not text.strip():
        return None
    try:
        return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise RagPersonaError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
