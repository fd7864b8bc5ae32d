"""Merging and task vectors on tiny random Qwen2 models: results match direct torch computations."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_qwen2, make_tokenizer
from safetensors.torch import load_file
from typer.testing import CliRunner

from rag_persona.errors import RagPersonaError
from training.merging import merge as merge_mod
from training.merging.evomerge import EvoConfig, evo_merge, persona_score
from training.merging.merge import merge, merge_adapters, merge_models
from training.merging.task_vectors import module_type, task_vectors, tensor_norms
from training.provenance import file_sha256
from training.shipping import ship_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _save_model(model, tok, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _finetuned(base_dir: Path, tok, path: Path, seed: int, scale: float = 0.02) -> Path:
    """The base with small seeded perturbations on every float tensor: a stand-in fine-tuned model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return _save_model(model, tok, path)


def _adapter(base_dir: Path, path: Path, seed: int, r: int = 4, alpha: int = 8) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(path)
    return path


class Setup:
    pass


@pytest.fixture(scope="module")
def s(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("merge")
    tok = make_tokenizer()
    st = Setup()
    st.root = root
    st.base = _save_model(make_tiny_qwen2(tok, seed=0), tok, root / "base")
    st.ft1 = _finetuned(st.base, tok, root / "ft1", seed=1)
    st.ft2 = _finetuned(st.base, tok, root / "ft2", seed=2)
    st.a1 = _adapter(st.base, root / "a1", seed=11)
    st.a2 = _adapter(st.base, root / "a2", seed=12)
    st.a_r2 = _adapter(st.base, root / "a_r2", seed=13, r=2, alpha=4)
    st.other_base = _save_model(make_tiny_qwen2(tok, seed=5), tok, root / "other-base")
    st.a_other = _adapter(st.other_base, root / "a_other", seed=14)
    st.wide = _save_model(make_tiny_qwen2(tok, seed=0, intermediate_size=48), tok, root / "wide")
    return st


def _lora(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """module → (A, B) of a saved adapter, and its scaling alpha / r."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    mods = {}
    for key, a in state.items():
        if ".lora_A." in key:
            mods[key.split(".lora_A.")[0]] = (a.float(), state[key.replace("lora_A", "lora_B")].float())
    return mods, cfg["lora_alpha"] / cfg["r"]


def _delta(folder: Path) -> dict[str, torch.Tensor]:
    mods, s = _lora(folder)
    return {m: b @ a * s for m, (a, b) in mods.items()}


# -- LoRA adapter merges ----------------------------------------------------------------------------------


def test_lora_linear_merge_is_peft_sqrt_weighting_and_cat_is_the_exact_weighted_delta(s, tmp_path):
    w = [0.7, 0.3]
    out = merge_adapters([s.a1, s.a2], tmp_path / "lin", method="linear", weights=w, base=str(s.base)).out
    (m1, s1), (m2, s2) = _lora(s.a1), _lora(s.a2)
    merged, s_m = _lora(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and s_m == 1.0
    assert cfg["base_model_name_or_path"] == str(s.base)
    assert len(merged) == 2 * 3  # 2 layers × 3 target modules
    for mod, (a_m, b_m) in merged.items():
        (a1, b1), (a2, b2) = m1[mod], m2[mod]
        # peft documents linear as a rough approximation: A and B are combined separately with √(w·scaling).
        c1, c2 = math.sqrt(w[0] * s1), math.sqrt(w[1] * s2)
        torch.testing.assert_close(a_m, c1 * a1 + c2 * a2)
        torch.testing.assert_close(b_m, c1 * b1 + c2 * b2)
        torch.testing.assert_close(b_m @ a_m, (c1 * b1 + c2 * b2) @ (c1 * a1 + c2 * a2))

    out = merge_adapters([s.a1, s.a2], tmp_path / "cat", method="cat", weights=w, base=str(s.base)).out
    cat, d1, d2 = _delta(out), _delta(s.a1), _delta(s.a2)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    for mod, d in cat.items():
        torch.testing.assert_close(d, w[0] * d1[mod] + w[1] * d2[mod], rtol=1e-5, atol=1e-6)
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["method"] == "cat" and manifest["weights"] == w and manifest["versions"]["peft"]
    assert manifest["inputs"][0]["weights_sha256"]["adapter_model.safetensors"] == file_sha256(
        s.a1 / "adapter_model.safetensors"
    )


def test_lora_merge_full_writes_a_standalone_model(s, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = [0.5, 1.0]
    out = merge_adapters(
        [s.a1, s.a2], tmp_path / "full", method="cat", weights=w, base=str(s.base), full=True
    ).out
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    AutoTokenizer.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out)
    merged, base = _state(out), _state(s.base)
    d1, d2 = _delta(s.a1), _delta(s.a2)
    key = "model.layers.1.self_attn.q_proj.weight"
    mod = "base_model.model.model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(merged[key], base[key] + w[0] * d1[mod] + w[1] * d2[mod], rtol=1e-5, atol=1e-5)
    assert torch.equal(
        merged["model.layers.1.self_attn.k_proj.weight"], base["model.layers.1.self_attn.k_proj.weight"]
    )


# -- full-model merges ----------------------------------------------------------------------------------


def _ties(deltas: list[torch.Tensor], w: list[float], density: float) -> torch.Tensor:
    """TIES written out: trim each delta to its top-k magnitudes, elect a sign, average the agreeing entries."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[d.abs().flatten().argsort(descending=True)[:k]] = True
        trimmed.append(d * keep.view_as(d))
    sign = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [t.sign() == sign for t in trimmed]
    total = sum(wi * t * a for wi, t, a in zip(w, trimmed, agree, strict=True))
    return total / torch.clamp(sum(a.float() for a in agree), min=1.0)


def test_model_merges_match_direct_torch(s, tmp_path):
    base, t1, t2 = _state(s.base), _state(s.ft1), _state(s.ft2)
    w = [0.6, 0.4]
    expected = {
        "linear": lambda k: (w[0] * t1[k] + w[1] * t2[k]) / sum(w),
        "task_arithmetic": lambda k: base[k] + w[0] * (t1[k] - base[k]) + w[1] * (t2[k] - base[k]),
        "ties": lambda k: base[k] + _ties([t1[k] - base[k], t2[k] - base[k]], w, 0.3),
    }
    for method, fn in expected.items():
        # A small shard size forces several shards and an index.
        out = merge_models(
            [s.ft1, s.ft2],
            tmp_path / method,
            base=str(s.base),
            method=method,
            weights=w,
            density=0.3 if method == "ties" else None,
            shard_bytes=20_000,
        ).out
        assert (out / "model.safetensors.index.json").is_file()
        merged = _state(out)
        assert set(merged) == set(base)
        for key in base:
            torch.testing.assert_close(merged[key], fn(key), rtol=1e-5, atol=1e-6, msg=f"{method} {key}")
        manifest = json.loads((out / "merge_manifest.json").read_text())
        assert manifest["method"] == method and manifest["density"] == (0.3 if method == "ties" else None)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "ties")


def test_dare_is_seeded_and_rescales_kept_entries(s, tmp_path):
    base, t1 = _state(s.base), _state(s.ft1)
    density = 0.4

    def run(name, seed):
        kw = dict(base=str(s.base), method="dare_linear", weights=[1.0, 0.0], density=density, seed=seed)
        return _state(merge_models([s.ft1, s.ft2], tmp_path / name, **kw).out)

    a, b, c = run("d1", 7), run("d2", 7), run("d3", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    key = "model.layers.0.mlp.down_proj.weight"
    got, delta = a[key] - base[key], t1[key] - base[key]
    kept = got != 0
    torch.testing.assert_close(got[kept], delta[kept] / density, rtol=1e-4, atol=1e-6)
    assert abs(kept.float().mean().item() - density) < 0.05


def test_adapter_among_models_is_folded_into_the_base(s, tmp_path):
    out = merge_models(
        [s.a1, s.ft1], tmp_path / "mixed", base=str(s.base), method="task_arithmetic", weights=[1.0, 0.0]
    ).out
    merged, base, d1 = _state(out), _state(s.base), _delta(s.a1)
    key = "model.layers.0.self_attn.v_proj.weight"
    expect = base[key] + d1["base_model.model.model.layers.0.self_attn.v_proj"]
    torch.testing.assert_close(merged[key], expect, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "merge_manifest.json").read_text())["inputs"][0]["role"] == "adapter"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- task vectors ---------------------------------------------------------------------------------------


def test_task_vector_norms_match_torch(s):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = task_vectors([s.ft1, s.ft2, s.a1], base=str(s.base), pairs=True)
    base, t1, t2 = _state(s.base), _state(s.ft1), _state(s.ft2)
    assert report.scopes == ["ft1 - base", "ft2 - base", "a1 - base", "ft1 - ft2", "ft1 - a1", "ft2 - a1"]

    flat = torch.cat([(t1[k] - base[k]).flatten() for k in base]).double()
    o = report.overall("ft1 - base")
    assert o["numel"] == flat.numel()
    assert o["l1"] == pytest.approx(torch.linalg.vector_norm(flat, 1).item(), rel=1e-6)
    assert o["l2"] == pytest.approx(torch.linalg.vector_norm(flat, 2).item(), rel=1e-6)

    layer1 = [r for r in report.per_layer("ft1 - ft2") if r["layer"] == 1][0]
    flat1 = torch.cat([(t1[k] - t2[k]).flatten() for k in base if ".layers.1." in k]).double()
    assert layer1["l2"] == pytest.approx(torch.linalg.vector_norm(flat1).item(), rel=1e-6)
    assert layer1["l1"] == pytest.approx(torch.linalg.vector_norm(flat1, 1).item(), rel=1e-6)

    q = [
        r
        for r in report.rows
        if r["scope"] == "ft2 - base" and r["layer"] == "all" and r["module"] == "q_proj"
    ][0]
    flat_q = torch.cat([(t2[k] - base[k]).flatten() for k in base if module_type(k) == "q_proj"]).double()
    assert q["l2"] == pytest.approx(torch.linalg.vector_norm(flat_q).item(), rel=1e-6)

    # The adapter's ΔW, computed by peft itself.
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(s.base), str(s.a1))
    deltas = [
        m.get_delta_weight("default").flatten()
        for m in peft_model.modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    ]
    assert len(deltas) == 6
    flat_a = torch.cat(deltas).double()
    oa = report.overall("a1 - base")
    assert oa["l2"] == pytest.approx(torch.linalg.vector_norm(flat_a).item(), rel=1e-5)
    assert oa["l1"] == pytest.approx(torch.linalg.vector_norm(flat_a, 1).item(), rel=1e-5)


def test_trimming_keeps_peft_share_of_entries(s):
    from peft.utils.merge_utils import prune

    t = torch.randn(37, 29, generator=torch.Generator().manual_seed(0))
    n = tensor_norms(t, 20.0)
    kept = prune(t, 0.2, method="magnitude")
    assert n.numel == int(0.2 * t.numel()) == int((kept != 0).sum())
    assert n.l1 == pytest.approx(kept.abs().sum().item(), rel=1e-6)
    assert n.l2 == pytest.approx(kept.norm().item(), rel=1e-6)

    report = task_vectors([s.ft1], base=str(s.base), top_percent=20)
    base = _state(s.base)
    assert report.overall("ft1 - base")["numel"] == sum(int(0.2 * v.numel()) for v in base.values())


# -- evolutionary merge ---------------------------------------------------------------------------------


def _lora_deltas(model, name: str) -> list[torch.Tensor]:
    return [
        m.get_delta_weight(name).float()
        for _, m in sorted(model.named_modules(), key=lambda x: x[0])
        if hasattr(m, "lora_A") and name in m.lora_A
    ]


def test_evo_merge_improves_on_its_start_and_logs_every_evaluation(s, tmp_path):
    target = [0.9, 0.2]
    seen = []

    def score_fn(loaded, name, params):
        model = loaded.model
        seen.append(sorted(model.peft_config))
        got = _lora_deltas(model, name)
        want = [
            target[0] * a + target[1] * b
            for a, b in zip(_lora_deltas(model, "a0"), _lora_deltas(model, "a1"), strict=True)
        ]
        dist = math.sqrt(sum(((g - w) ** 2).sum().item() for g, w in zip(got, want, strict=True)))
        return -dist, {"distance": dist}

    log = tmp_path / "evo.jsonl"
    cfg = EvoConfig(method="cat", budget=10, population_size=4, sigma=0.3, seed=3)
    result = evo_merge(
        [s.a1, s.a2], tmp_path / "evo", score_fn=score_fn, config=cfg, base=str(s.base), log_path=log
    )
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 10 and [x["eval"] for x in lines] == list(range(10))
    assert lines[0]["params"]["weights"] == [0.5, 0.5] and lines[0]["generation"] == 0
    assert set(lines[0]) >= {"eval", "generation", "params", "metrics", "score", "seconds"}
    assert result.best["score"] > lines[0]["score"]
    # One candidate at a time beside the two inputs: each is deleted after scoring.
    assert all(len(names) == 3 for names in seen)
    out = result.out
    assert (out / "adapter_model.safetensors").is_file() and (out / "evo_log.jsonl").is_file()
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["weights"] == result.best["params"]["weights"]
    assert manifest["evo"]["best_score"] == result.best["score"]
    # The exported adapter is the best candidate: the ΔW its weights give (peft stores it in the bf16 of the
    # base that load_causal_lm loads, hence the tolerance).
    best_w = result.best["params"]["weights"]
    got, d1, d2 = _delta(out), _delta(s.a1), _delta(s.a2)
    for mod, d in got.items():
        want = best_w[0] * d1[mod] + best_w[1] * d2[mod]
        assert (d - want).norm() / want.norm() < 1e-2

    again = evo_merge(
        [s.a1, s.a2],
        tmp_path / "evo2",
        score_fn=score_fn,
        config=cfg,
        base=str(s.base),
        log_path=tmp_path / "e2.jsonl",
    )
    assert again.best["params"] == result.best["params"]


def test_persona_score_is_the_mean_of_available_rates():
    summary = {"style_rate": 1.0, "eos_rate": 0.5, "length_in_range_rate": 0.0, "fact_accuracy": None}
    assert persona_score(summary) == pytest.approx(0.5)
    assert persona_score({**summary, "fact_accuracy": 1.0}) == pytest.approx(0.625)


# -- bad input and interrupted writes -------------------------------------------------------------------


def test_bad_input_is_one_clear_error(s, tmp_path, monkeypatch):
    import rag_persona.generation
    import training.merging.merge as merge_module

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    # every refusal below comes before any weights load
    monkeypatch.setattr(merge_module, "load_base_model", never)
    monkeypatch.setattr(rag_persona.generation, "load_causal_lm", never)
    out = tmp_path / "out"
    cases = [
        (lambda: merge([s.a1, tmp_path / "nope"], out), "nope: no such folder"),
        (lambda: merge([s.a1], out), "at least two inputs"),
        (lambda: merge([s.a1, s.a2], out, weights=[1.0], base=str(s.base)), "1 weights given for 2 adapters"),
        (lambda: merge([s.a1, s.a_r2], out, method="linear", base=str(s.base)), "equal rank.*r=4.*r=2"),
        (lambda: merge([s.a1, s.a_other], out), "different bases"),
        (lambda: merge([s.a1, s.a2], out, method="ties", base=str(s.base)), "needs a density"),
        (
            lambda: merge([s.a1, s.a2], out, method="task_arithmetic", base=str(s.base)),
            "not an adapter merge",
        ),
        (lambda: merge([s.ft1, s.ft2], out, method="cat", base=str(s.base)), "not a model merge"),
        (lambda: merge([s.ft1, s.ft2], out, method="ties", density=1.5, base=str(s.base)), "outside"),
        (lambda: merge([s.ft1, s.wide], out, method="linear", base=str(s.base)), "wide: tensor .* has shape"),
        (lambda: merge([s.ft1, s.ft2], out, base=str(tmp_path / "nobase")), "nobase"),
        (lambda: task_vectors([s.ft1], base=str(s.base), top_percent=0), "--top-percent"),
        (lambda: task_vectors([s.ft1], base=str(s.base), pairs=True), "at least two"),
        (
            lambda: evo_merge([s.a1, s.a2], out, score_fn=None, config=EvoConfig(budget=0), base=str(s.base)),
            "--budget",
        ),
        (lambda: EvoConfig(population_size=2).validate(2), "--population: 2"),
        (lambda: merge([s.a1, list_config], out), r"adapter_config\.json: expected a JSON object, got list"),
        (
            lambda: ship_adapter(s.a1, tmp_path / "shipped"),
            r"metrics\.json: no such file: not a training run",
        ),
        # checked before any weights load
        (lambda: merge([s.a1, s.a1], out, base=str(s.base)), "a1 is given twice"),
        (lambda: merge([s.a1, s.a2], out, weights=[0, 0], base=str(s.base)), "all 0"),
        (lambda: merge([s.a1, s.a2], out, density=0.5, base=str(s.base)), "linear does not use a density"),
        (lambda: merge([s.a1, s.a2], out, method="svd", svd_rank=0, base=str(s.base)), "--svd-rank: 0"),
        (lambda: merge([s.ft1, s.ft2], out, base=str(s.base), shard_bytes=0), "--shard-mb"),
        (lambda: merge([s.a1, s.a2], s.a2, base=str(s.base)), "holds no merge_manifest.json"),
        (lambda: merge([s.a1, s.a2], a_file, base=str(s.base)), "exists and is not a folder"),
        (lambda: task_vectors([s.a1, s.a1]), "a1 is given twice"),
        (
            lambda: task_vectors([s.a1], csv_path=s.a1 / "adapter_model.safetensors"),
            "is input .*a1 or a file in it",
        ),
        (lambda: task_vectors([s.a1], csv_path=a_file, plot_path=a_file), "both name"),
        (lambda: task_vectors([s.a1], plot_path=s.root), "is a folder"),
        (lambda: EvoConfig(seed=-1).validate(2), "--seed: -1"),
        (lambda: EvoConfig(sigma=float("nan")).validate(2), "--sigma: nan"),
        (lambda: EvoConfig(init_weights=[float("nan"), 0.5]).validate(2), "non-finite"),
        (lambda: EvoConfig(init_density=float("nan"), method="ties").validate(2), "non-finite"),
        (lambda: evo_merge([s.a1, s.a2], out, score_fn=None, log_path=a_file), "not an evo-merge log"),
        (lambda: task_vectors([garbage_model], base=str(s.base)), "not a readable safetensors file"),
        (lambda: task_vectors([bad_index], base=str(s.base)), "field 'weight_map'"),
        (lambda: merge([s.a1, garbage_adapter], out, base=str(s.base)), "not a readable safetensors file"),
        (lambda: merge([s.a1, earlier], earlier, base=str(s.base)), "earlier: is one of the inputs"),
        (lambda: task_vectors([s.a1], csv_path=link / "adapter_model.safetensors"), "is input .*a1"),
        (
            lambda: evo_merge([s.a1, s.a2], out, score_fn=None, log_path=out / "log.jsonl"),
            "lies inside --out",
        ),
    ]
    earlier = tmp_path / "earlier"  # an earlier merge output, merged again into itself
    shutil.copytree(s.a2, earlier)
    (earlier / "merge_manifest.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(s.a1)
    garbage_model, bad_index, garbage_adapter = tmp_path / "gm", tmp_path / "bi", tmp_path / "ga"
    garbage_model.mkdir()
    (garbage_model / "model.safetensors").write_bytes(b"\x01\x00")
    bad_index.mkdir()
    (bad_index / "model.safetensors.index.json").write_text('{"weight_map": []}')
    shutil.copytree(s.a2, garbage_adapter)
    (garbage_adapter / "adapter_model.safetensors").write_bytes(b"\x01\x00")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("the user's own notes\n")
    weights_before = (s.a1 / "adapter_model.safetensors").read_bytes()
    list_config = tmp_path / "list-config"
    shutil.copytree(s.a1, list_config)
    (list_config / "adapter_config.json").write_text("[]")
    for fn, pattern in cases:
        with pytest.raises(RagPersonaError, match=pattern) as err:
            fn()
        assert "\n" not in str(err.value)
    assert not out.exists()
    assert a_file.read_text() == "the user's own notes\n"
    assert (s.a1 / "adapter_model.safetensors").read_bytes() == weights_before


def test_interrupted_write_leaves_nothing_and_keeps_an_old_output(s, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    out = tmp_path / "merged"
    monkeypatch.setattr(merge_mod, "copy_model_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_models([s.ft1, s.ft2], out, base=str(s.base), method="linear")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "merge_manifest.json").write_text("{}")  # an earlier merge output
    (out / "old.txt").write_text("keep")
    monkeypatch.setattr(merge_mod, "export_adapter", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapters([s.a1, s.a2], out, base=str(s.base))
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and (out / "old.txt").read_text() == "keep"

    # A folder that is not a merge output is never replaced.
    (out / "merge_manifest.json").unlink()
    with pytest.raises(RagPersonaError, match="holds no merge_manifest.json; refusing to replace it"):
        merge_adapters([s.a1, s.a2], out, base=str(s.base))
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


# -- CLI ------------------------------------------------------------------------------------------------


def test_cli_merge_and_task_vectors(s, tmp_path):
    from rag_persona.cli.app import app

    runner = CliRunner()
    out = tmp_path / "ties"
    res = runner.invoke(
        app,
        [
            "merge",
            str(s.a1),
            str(s.a2),
            "--base",
            str(s.base),
            "--method",
            "ties",
            "--density",
            "0.5",
            "--weights",
            "0.5,0.5",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "merge_manifest.json").read_text())["density"] == 0.5

    res = runner.invoke(
        app,
        [
            "merge",
            str(s.ft1),
            str(s.ft2),
            "--base",
            str(s.base),
            "--method",
            "task_arithmetic",
            "--weights",
            "1,1",
            "--out",
            str(tmp_path / "ta"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "model-merge task_arithmetic" in res.output and (tmp_path / "ta" / "model.safetensors").is_file()

    csv_path, png = tmp_path / "tv.csv", tmp_path / "tv.png"
    res = runner.invoke(
        app,
        [
            "task-vectors",
            str(s.ft1),
            str(s.ft2),
            str(s.a1),
            "--base",
            str(s.base),
            "--pairs",
            "--top-percent",
            "20",
            "--csv",
            str(csv_path),
            "--plot",
            str(png),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "scope,layer,module,l1,l2,numel" and len(lines) > 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = runner.invoke(
        app, ["merge", str(s.a1), str(s.a2), "--weights", "1", "--base", str(s.base), "--out", str(out)]
    )
    assert bad.exit_code == 2 and "error: --weights: 1 weights given for 2 adapters" in bad.output


def test_cli_evo_merge_with_the_persona_score(s, tmp_path, monkeypatch):
    """The default score runs the persona evaluation; retrieval is faked so no embedder is needed."""
    import rag_persona.evaluation.evaluate as ev
    from rag_persona.cli.app import app

    class Fact:
        def __init__(self, id, text):
            self.id, self.text, self.fact_id, self.score = id, text, id, 0.9

    class Store:
        facts = [Fact("hobby", "趣味はピアノと乗馬。")]

    class Retriever:
        def search(self, query):
            return Store.facts if "趣味" in query else []

    monkeypatch.setattr(
        ev, "open_retriever", lambda index=None, persona=None, log=None: (Store(), Retriever())
    )
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"query": "趣味は何ですか？", "golden_ids": ["hobby"]}, {"query": "こんにちは", "golden_ids": []}]
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    out, log = tmp_path / "evo", tmp_path / "evo.jsonl"
    res = CliRunner().invoke(
        app,
        [
            "evo-merge",
            str(s.a1),
            str(s.a2),
            "--prompts",
            str(prompts),
            "--base",
            str(s.base),
            "--method",
            "dare_ties",
            "--budget",
            "3",
            "--population",
            "4",
            "--max-new-tokens",
            "3",
            "--out",
            str(out),
            "--log",
            str(log),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 3 and all(x["params"]["density"] is not None for x in lines)
    for x in lines:
        assert x["score"] == pytest.approx(persona_score(x["metrics"])) and x["metrics"]["n"] == 2
    assert (out / "adapter_model.safetensors").is_file()
    evo = json.loads((out / "merge_manifest.json").read_text())["evo"]
    assert evo["score_fn"] == "persona_score"
    assert (evo["budget"], evo["population_size"], evo["init_density"]) == (3, 4, 0.5)
