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

import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import atomic_folder, check_replaceable, write_json
from training.provenance import versions

from .folders import (
    ADAPTER_WEIGHTS,
    DEFAULT_SHARD_BYTES,
    SafetensorsFolder,
    ShardWriter,
    adapters_base,
    canonical_base,
    check_input_folders,
    copy_model_files,
    default_adapter_base,
    input_record,
    is_adapter_dir,
    load_base_model,
    read_adapter_config,
    resolve_base,
)

MANIFEST = "merge_manifest.json"

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


def needs_density(method: str) -> bool:
    return any(tag in method for tag in ("ties", "dare", "magnitude_prune"))


def check_weights(weights: Sequence[float] | None, n: int, what: str = "inputs") -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0 / n] * n
    if len(weights) != n:
        raise RagPersonaError(f"--weights: {len(weights)} weights given for {n} {what}")
    if not all(math.isfinite(w) for w in weights):
        raise RagPersonaError(f"--weights: {list(weights)} has a non-finite value")
    if not any(weights):
        raise RagPersonaError(f"--weights: {list(weights)} are all 0; the merge would change nothing")
    return [float(w) for w in weights]


def check_density(method: str, density: float | None) -> float | None:
    if not needs_density(method):
        if density is not None:  # silently dropping it would hide a typo in --method
            raise RagPersonaError(f"--density: method {method} does not use a density")
        return None
    if density is None:
        raise RagPersonaError(f"--density: method {method} needs a density (share of entries kept, 0–1]")
    if not 0.0 < density <= 1.0:
        raise RagPersonaError(f"--density: {density} is outside (0, 1]")
    return float(density)


def check_inputs(inputs: Sequence[str | Path], need_two: bool = True) -> list[Path]:
    paths = [Path(p) for p in inputs]
    if need_two and len(paths) < 2:
        raise RagPersonaError(f"merge: needs at least two inputs, got {len(paths)}")
    check_input_folders(paths, "merge")
    return paths


def check_output(out: str | Path, inputs: Sequence[Path], shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Before any weights load: `out` is a merge output we may replace, not an input, and shards are sized."""
    out = Path(out)
    check_replaceable(out.absolute(), MANIFEST, "a merge output")
    if any(out.resolve() == p.resolve() for p in inputs):
        raise RagPersonaError(f"--out {out}: is one of the inputs; refusing to replace it")
    if shard_bytes <= 0:
        raise RagPersonaError(f"--shard-mb: {shard_bytes / 1e6:g} must be positive")
    return out


def check_svd_rank(svd_rank: int | None) -> int | None:
    if svd_rank is not None and svd_rank < 1:
        raise RagPersonaError(f"--svd-rank: {svd_rank} must be at least 1")
    return svd_rank


@contextmanager
def merge_folder(out: Path) -> Iterator[Path]:
    """A hidden work folder that becomes `out` when the block ends without error; an existing `out` is
    replaced only if it is an earlier merge output (it holds merge_manifest.json)."""
    with atomic_folder(out, marker=MANIFEST, what="a merge output") as work:
        yield work


def write_manifest(work: Path, manifest: dict) -> None:
    write_json(work / MANIFEST, manifest, indent=1)


# -- LoRA adapters on one base ------------------------------------------------------------------------------


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
    adapters = check_inputs(adapters)
    out = check_output(out, adapters, shard_bytes)
    check_adapters(adapters, method)
    weights = check_weights(weights, len(adapters), "adapters")
    density = check_density(method, density)
    check_svd_rank(svd_rank)
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
        "versions": versions("safetensors"),
    }
    with merge_folder(out) as work:
        if full:
            peft_model.set_adapter("merged")
            merged = peft_model.merge_and_unload(adapter_names=["merged"])
            copy_model_files(base_path, work)
            merged.save_pretrained(str(work), safe_serialization=True, max_shard_size=shard_bytes)
        else:
            export_adapter(peft_model, "merged", work, base_label)
        manifest["seconds"] = round(time.time() - started, 1)
        write_manifest(work, manifest)
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
    models = check_inputs(models)
    out = check_output(out, models, shard_bytes)
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
        "versions": versions("safetensors"),
    }
    w = torch.tensor(weights, dtype=torch.float32)
    with merge_folder(out) as work, ExitStack() as stack:
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
        write_manifest(work, manifest)
    progress(f"wrote {out}")
    return MergeResult(out, manifest)


def merge(inputs: Sequence[str | Path], out: str | Path, **options) -> MergeResult:
    """Adapters only → peft adapter merge (merge_adapters); any full model among the inputs → streamed model
    merge (merge_models, which has no `full` and no `svd_rank`). `options` are those functions' settings."""
    paths = check_inputs(inputs)
    if all(is_adapter_dir(p) for p in paths):
        return merge_adapters(paths, out, **options)
    if options.pop("svd_rank", None) is not None:
        raise RagPersonaError("--svd-rank: only adapter merges use it")
    options.pop("full", None)  # a model merge always writes a model
    return merge_models(paths, out, **options)


def parse_floats(text: str | None, what: str) -> list[float] | None:
    """'0.7,0.3' or '0.7 0.3' → [0.7, 0.3]; a one-line error naming the option otherwise."""
    if text is None or not text.strip():
        return None
    try:
        return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise RagPersonaError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
