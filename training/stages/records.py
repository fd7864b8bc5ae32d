"""What a training run folder holds besides its weights: recipe, data manifest, metrics, log, loss curve, lineage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from training.provenance import file_sha256
from training.recipes import Recipe

RUN_MARKER = "recipe.yaml"  # every run folder holds it: a folder without it is not ours to replace
PROVENANCE = ("recipe.yaml", "data_manifest.json", "metrics.json", "loss.png")
# Keys of build-data's manifest that a run's data manifest repeats.
BUILD_KEYS = (
    "format_version",
    "prompt_template_version",
    "seed",
    "knowledge_hash",
    "dialogues_sha256",
    "counts",
    "retrieval",
    "config",
)


def clean(d: dict) -> dict:
    """Trainer metrics rounded to 6 places (floats only)."""
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def lineage(init: Path) -> dict:
    """The records of the adapter a run continues: its metrics, data manifest (without sources) and recipe."""
    info = {"adapter": str(init)}
    for name in ("metrics.json", "data_manifest.json"):
        if (init / name).is_file():
            data = _read_json(init / name)
            if name == "data_manifest.json":
                data.get("train", {}).pop("sources", None)
            info[name.split(".")[0]] = data
    if (init / "recipe.yaml").is_file():
        info["recipe"] = yaml.safe_load((init / "recipe.yaml").read_text(encoding="utf-8"))
    return info


def _file_record(path: Path, rows: int, data) -> dict:
    return {
        "file": str(path),
        "sha256": file_sha256(path),
        "rows": rows,
        "used": len(data.examples),
        "dropped_too_long": len(data.dropped_too_long),
    }


def data_manifest(train_path: Path, eval_path: Path | None, train, evald, totals: dict) -> dict:
    """The files a run trained on (hashes, rows used and dropped, sources) and build-data's manifest."""
    build = None
    if (train_path.parent / "manifest.json").is_file():
        build = _read_json(train_path.parent / "manifest.json")
        build = {k: build.get(k) for k in BUILD_KEYS}
    out = {
        "train": _file_record(train_path, totals["train"], train) | {"sources": train.sources},
        "build_data_manifest": build,
    }
    if eval_path is not None and evald is not None:
        out["eval"] = _file_record(eval_path, totals["eval"], evald)
    return out


def _dump(path: Path, obj, *, ascii_only: bool = False) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=ascii_only, indent=1), encoding="utf-8")


def write_run_files(
    work: Path,
    recipe: Recipe,
    metrics: dict,
    history: list[dict],
    manifest: dict,
    *,
    second: tuple[str, str] | None = None,
) -> None:
    """Write the provenance files next to the trained weights in `work`; drop the trainer's checkpoints."""
    _dump(work / "log_history.json", history, ascii_only=True)
    before = (metrics.get("eval_before") or {}).get("eval_loss")
    extra = {"second": second} if second else {}
    plot_losses(history, work / "loss.png", f"{recipe.stage.upper()} {recipe.name}", before, **extra)
    (work / "recipe.yaml").write_text(
        yaml.safe_dump(recipe.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    _dump(work / "data_manifest.json", manifest)
    _dump(work / "metrics.json", metrics)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)


def plot_losses(
    history: list[dict],
    path: Path,
    title: str,
    eval_before: float | None = None,
    second: tuple[str, str] = ("rewards/margins", "reward margin (chosen − rejected)"),
) -> Path:
    """Train/eval loss, and a second panel with `second` = (log key, axis label) when the log has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if eval_before is not None:
        evals = [(0, eval_before), *evals]
    key, label = second
    margins = [(h["step"], h[key]) for h in history if key in h and "loss" in h]
    ncols = 2 if margins else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    if margins:
        ax2 = axes[0][1]
        ax2.plot(*zip(*margins, strict=True), lw=1, color="tab:green")
        ax2.set_xlabel("step")
        ax2.set_ylabel(label)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
