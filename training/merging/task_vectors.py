"""Task-vector analysis: L1/L2 norms of (model − base) and (model A − model B), per layer and module type.

Inputs are full model folders or LoRA adapter folders. A model's task vector is θ − θ_base, tensor by tensor;
an adapter's is its own ΔW = B·A·scaling per adapted module (scaling = lora_alpha / r, or / √r with rsLoRA;
alpha_pattern honoured), computed from its safetensors and adapter_config.json, so it needs no base (full
`modules_to_save` tensors are compared with the base when one is given, else skipped). Pairs compare two
inputs' task vectors (for two full models simply θ_A − θ_B).

With `top_percent` < 100 each tensor's difference is first trimmed as TIES-merging trims it, with peft's own
`merge_utils.prune(..., method="magnitude")`: the k = int(top_percent/100 · numel) largest magnitudes are kept
(peft floors, it does not round), and l1, l2 and numel cover only those k entries.

Every tensor is read lazily from safetensors, so at most one tensor per input (plus the base's) is in memory.
Rows: scope, layer, module, l1, l2, numel — `layer`/`module` are "all" for the aggregate rows; per-layer
rows cover the decoder blocks (`….layers.<i>.…`), per-module rows every tensor.
"""

from __future__ import annotations

import csv
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import check_output_file, write_file_atomic

from .folders import SafetensorsFolder, check_input_folders, is_adapter_dir, read_adapter_config, resolve_base

PROJ_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_TYPES = (*PROJ_TYPES, "embed", "lm_head", "norm", "other")
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_LORA_EMB_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$"
)


def module_type(name: str) -> str:
    parts = name.split(".")
    for t in PROJ_TYPES:
        if t in parts:
            return t
    if "lm_head" in parts:
        return "lm_head"
    if any(p in ("embed_tokens", "wte", "wpe", "embeddings") or p.startswith("embed") for p in parts):
        return "embed"
    if any("norm" in p for p in parts):
        return "norm"
    return "other"


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


# -- sources: a model folder or an adapter folder -----------------------------------------------------------


@dataclass
class LoraModule:
    a_key: str
    b_key: str
    scaling: float
    embedding: bool = False
    fan_in_fan_out: bool = False


@dataclass
class Source:
    """One input: a full model (tensors) or a LoRA adapter (ΔW per adapted module)."""

    path: Path
    label: str
    kind: str
    reader: SafetensorsFolder | None = None
    lora: dict[str, LoraModule] = field(default_factory=dict)
    full: dict[str, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        if self.kind == "model":
            return self.reader.keys()
        return [*self.lora, *self.full]

    def value(self, key: str, base: SafetensorsFolder | None):
        """θ for a model; ΔW for an adapter (None where the adapter leaves the tensor alone)."""
        if self.kind == "model":
            return self.reader.get(key) if key in self.reader else None
        if key in self.lora:
            m = self.lora[key]
            a = self.reader.get(m.a_key).float()
            b = self.reader.get(m.b_key).float()
            delta = b @ a
            if m.embedding or m.fan_in_fan_out:
                delta = delta.T
            return delta * m.scaling
        if key in self.full and base is not None and key in base:
            return self.reader.get(self.full[key]).float() - base.get(key).float()
        return None


def _adapter_source(path: Path, label: str, reader: SafetensorsFolder) -> Source:
    from peft.utils.other import get_pattern_key

    cfg = read_adapter_config(path)
    if cfg.get("use_dora"):
        raise RagPersonaError(f"{path}: DoRA adapters are not supported (ΔW is not B·A·scaling)")
    alpha_pattern = cfg.get("alpha_pattern") or {}
    src = Source(path=path, label=label, kind="adapter", reader=reader)
    parts: dict[str, dict[str, str]] = defaultdict(dict)
    for key in reader.keys():
        m = _LORA_KEY.match(key) or _LORA_EMB_KEY.match(key)
        if m:
            parts[m.group("module")][m.group("part")[-1]] = key
        elif "lora_" in key:
            raise RagPersonaError(f"{path}: tensor {key} is not a plain LoRA A/B weight")
        else:
            src.full[key.removeprefix("base_model.model.")] = key
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise RagPersonaError(f"{path}: module {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        r = reader.shape(ab["A"])[0]
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        src.lora[f"{module}.weight"] = LoraModule(
            ab["A"],
            ab["B"],
            scaling,
            embedding="lora_embedding" in ab["A"],
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
        )
    return src


def _labels(paths: Sequence[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


# -- accumulation -----------------------------------------------------------------------------------------


@dataclass
class Norms:
    l1: float = 0.0
    sq: float = 0.0
    numel: int = 0

    def add(self, other: Norms) -> None:
        self.l1 += other.l1
        self.sq += other.sq
        self.numel += other.numel

    @property
    def l2(self) -> float:
        return math.sqrt(self.sq)


def tensor_norms(diff, top_percent: float = 100.0) -> Norms:
    """L1, squared L2 and entry count of one difference tensor, trimmed to its top magnitudes (peft's rule)."""
    import torch
    from peft.utils.merge_utils import prune

    d = diff.float()
    n = d.numel()
    if top_percent < 100.0:
        density = top_percent / 100.0
        d = prune(d, density, method="magnitude")
        n = int(density * d.numel())
    l1 = torch.linalg.vector_norm(d, 1, dtype=torch.float64).item()
    l2 = torch.linalg.vector_norm(d, 2, dtype=torch.float64).item()
    return Norms(l1, l2 * l2, n)


@dataclass
class TaskVectorReport:
    """All rows plus where the CSV and plot went."""

    rows: list[dict]
    scopes: list[str]
    top_percent: float
    base: str | None = None
    csv: str | None = None
    plot: str | None = None
    skipped: list[str] = field(default_factory=list)

    def overall(self, scope: str) -> dict:
        return next(
            r for r in self.rows if r["scope"] == scope and r["layer"] == "all" and r["module"] == "all"
        )

    def per_layer(self, scope: str) -> list[dict]:
        return [r for r in self.rows if r["scope"] == scope and r["module"] == "all" and r["layer"] != "all"]

    def to_dict(self) -> dict:
        return {
            "scopes": self.scopes,
            "top_percent": self.top_percent,
            "base": self.base,
            "csv": self.csv,
            "plot": self.plot,
            "overall": {s: self.overall(s) for s in self.scopes},
            "skipped": self.skipped,
            "rows": self.rows,
        }


def _rows(scope: str, cells: dict[tuple[int | None, str], Norms]) -> list[dict]:
    def row(layer, module, n: Norms) -> dict:
        return {"scope": scope, "layer": layer, "module": module, "l1": n.l1, "l2": n.l2, "numel": n.numel}

    total, by_layer, by_module = Norms(), defaultdict(Norms), defaultdict(Norms)
    for (layer, module), n in cells.items():
        total.add(n)
        by_module[module].add(n)
        if layer is not None:
            by_layer[layer].add(n)
    out = [row("all", "all", total)]
    out += [row("all", m, by_module[m]) for m in MODULE_TYPES if m in by_module]
    out += [row(i, "all", by_layer[i]) for i in sorted(by_layer)]
    out += [row(i, m, cells[(i, m)]) for i in sorted(by_layer) for m in MODULE_TYPES if (i, m) in cells]
    return out


# -- the analysis -----------------------------------------------------------------------------------------


def task_vectors(
    inputs: Sequence[str | Path],
    *,
    base: str | None = None,
    pairs: bool = False,
    top_percent: float = 100.0,
    csv_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> TaskVectorReport:
    """Norms of each input's task vector (vs the base) and, with pairs, of every pair's difference.

    A base is needed for full-model inputs' own task vectors; when none is named it is the default chat
    model, except when every input is a full model and pairs are asked for: then only pairs are computed.
    """
    paths = _check_inputs(inputs, pairs, top_percent)
    if csv_path and plot_path and Path(csv_path).absolute() == Path(plot_path).absolute():
        raise RagPersonaError(f"--csv and --plot: both name {csv_path}; give two files")

    def check_outputs(sources: list[Path]) -> None:
        for flag, out in (("--csv", csv_path), ("--plot", plot_path)):
            if out:  # before any tensor is read: the analysis of a 1.5B takes minutes
                check_output_file(out, flag, sources)

    check_outputs(paths)
    kinds = ["adapter" if is_adapter_dir(p) else "model" for p in paths]
    all_models = all(k == "model" for k in kinds)
    base_label = base_path = None
    if base or ("model" in kinds and not (pairs and all_models)):
        base_label, base_path = resolve_base(base, progress)
        check_outputs([base_path])  # an alias or the default base is a folder only now
    labels = _labels(paths)
    with ExitStack() as stack:
        base_st = stack.enter_context(SafetensorsFolder(base_path).opened()) if base_path else None
        sources = []
        for p, label, kind in zip(paths, labels, kinds, strict=True):
            reader = stack.enter_context(SafetensorsFolder(p).opened())
            sources.append(
                _adapter_source(p, label, reader) if kind == "adapter" else Source(p, label, "model", reader)
            )
        scopes, skipped = _scopes(sources, base_st is not None, pairs)
        keys = _ordered_keys(base_st, sources)
        for s in sources:
            if s.kind == "model" and base_st is not None:
                extra = [k for k in s.keys() if k not in base_st]
                if extra:
                    raise RagPersonaError(f"{s.path}: has tensor {extra[0]} that base {base_label} lacks")
        cells = {name: defaultdict(Norms) for name, _ in scopes}
        for i, key in enumerate(keys, 1):
            for name, diff in _diffs(key, scopes, base_st):
                cells[name][(layer_index(key), module_type(key))].add(tensor_norms(diff, top_percent))
            if i % 100 == 0:
                progress(f"{i}/{len(keys)} tensors")
    rows = [r for name, _ in scopes for r in _rows(name, cells[name])]
    report = TaskVectorReport(
        rows=rows,
        scopes=[name for name, _ in scopes],
        top_percent=top_percent,
        base=base_label,
        skipped=skipped,
    )
    if csv_path:
        report.csv = str(write_csv(rows, Path(csv_path)))
    if plot_path:
        report.plot = str(plot_layers(report, Path(plot_path)))
    return report


def _check_inputs(inputs: Sequence[str | Path], pairs: bool, top_percent: float) -> list[Path]:
    paths = [Path(p) for p in inputs]
    if not paths:
        raise RagPersonaError("task-vectors: no inputs given")
    check_input_folders(paths, "task-vectors")
    if not 0.0 < top_percent <= 100.0:
        raise RagPersonaError(f"--top-percent: {top_percent} is outside (0, 100]")
    if pairs and len(paths) < 2:
        raise RagPersonaError("--pairs: needs at least two inputs")
    return paths


def _scopes(
    sources: Sequence[Source], has_base: bool, pairs: bool
) -> tuple[list[tuple[str, tuple]], list[str]]:
    """(scope name, its sources) to compute, and notes on what cannot be computed without a base."""
    scopes: list[tuple[str, tuple]] = []
    skipped = []
    for s in sources:
        if s.kind == "adapter" or has_base:
            scopes.append((f"{s.label} - base", (s,)))
        if s.kind == "adapter" and s.full and not has_base:
            skipped.append(f"{s.label}: {len(s.full)} full (modules_to_save) tensors need --base")
    if pairs:
        scopes += [(f"{a.label} - {b.label}", (a, b)) for a, b in itertools.combinations(sources, 2)]
    return scopes, skipped


def _ordered_keys(base_st: SafetensorsFolder | None, sources: Sequence[Source]) -> list[str]:
    seen = dict.fromkeys(base_st.keys()) if base_st is not None else {}
    for s in sources:
        seen.update(dict.fromkeys(s.keys()))
    return list(seen)


class _TensorValues:
    """One tensor's value in each source (each read once) and in the base, and the differences asked for."""

    def __init__(self, key: str, base_st: SafetensorsFolder | None):
        self.key, self.base_st = key, base_st
        self.values: dict[int, object] = {}
        self.base_t = None

    def value(self, s: Source):
        if id(s) not in self.values:
            v = s.value(self.key, self.base_st)
            self.values[id(s)] = v if v is not None and v.is_floating_point() else None
        return self.values[id(s)]

    def base_value(self):
        if self.base_t is None and self.base_st is not None and self.key in self.base_st:
            self.base_t = self.base_st.get(self.key).float()
        return self.base_t

    def task_vector(self, s: Source):
        v = self.value(s)
        if v is None or s.kind == "adapter":
            return v
        b = self.base_value()
        if b is None:
            raise RagPersonaError(f"{s.path}: tensor {self.key} is not in the base")
        if tuple(b.shape) != tuple(v.shape):
            raise RagPersonaError(
                f"{s.path}: tensor {self.key} has shape {tuple(v.shape)}, the base {tuple(b.shape)}"
            )
        return v.float() - b

    def models_diff(self, a: Source, b: Source):
        """θ_A − θ_B of two full models (both must hold the tensor, in one shape)."""
        va, vb = self.value(a), self.value(b)
        if va is None or vb is None:
            missing = a if va is None else b
            raise RagPersonaError(
                f"{missing.path}: lacks tensor {self.key} that {b.path if va is None else a.path} has"
            )
        if tuple(va.shape) != tuple(vb.shape):
            raise RagPersonaError(
                f"{b.path}: tensor {self.key} has shape {tuple(vb.shape)}, {a.path} {tuple(va.shape)}"
            )
        return va.float() - vb.float()

    def pair_diff(self, a: Source, b: Source):
        """The difference of two inputs' task vectors (None where neither touches the tensor)."""
        if a.kind == "model" and b.kind == "model":
            return self.models_diff(a, b)
        ta, tb = self.task_vector(a), self.task_vector(b)
        if ta is None or tb is None:
            return ta if tb is None else -tb
        if tuple(ta.shape) != tuple(tb.shape):
            raise RagPersonaError(
                f"{b.path}: ΔW of {self.key} has shape {tuple(tb.shape)}, {a.path} {tuple(ta.shape)}"
            )
        return ta - tb


def _diffs(key: str, scopes, base_st) -> Iterator[tuple[str, object]]:
    """(scope, difference tensor) for every scope that touches this tensor; one value per source loaded."""
    values = _TensorValues(key, base_st)
    for name, members in scopes:
        diff = values.task_vector(members[0]) if len(members) == 1 else values.pair_diff(*members)
        if diff is not None:
            yield name, diff


# -- outputs ----------------------------------------------------------------------------------------------

CSV_FIELDS = ("scope", "layer", "module", "l1", "l2", "numel")


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_FIELDS)
            for r in rows:
                w.writerow(
                    [r["scope"], r["layer"], r["module"], f"{r['l1']:.9g}", f"{r['l2']:.9g}", r["numel"]]
                )

    return write_file_atomic(path, write)


def plot_layers(report: TaskVectorReport, path: Path) -> Path:
    """Per-layer L2 of every scope as lines (one per compared pair), overall L2 in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for scope in report.scopes:
        layers = report.per_layer(scope)
        total = report.overall(scope)["l2"]
        label = f"{scope} (overall L2 {total:.4g})"
        if layers:
            ax.plot([r["layer"] for r in layers], [r["l2"] for r in layers], marker="o", label=label)
        else:
            ax.axhline(total, linestyle="--", label=label)
    trim = "" if report.top_percent >= 100 else f", top {report.top_percent:g}% magnitudes per tensor"
    ax.set_title(f"Task-vector L2 per layer{trim}")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("L2 norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, dpi=120, format="png")

    try:
        return write_file_atomic(path, write)
    finally:
        plt.close(fig)
