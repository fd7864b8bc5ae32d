"""bench/forgetting.py mechanics: the plan, the cell recipes, replay and layer choice on real rows of a tiny
model, the kept CPT adapter re-merged, skipped finished cells, the budget, and the table from result dicts."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_training_folders
from safetensors.torch import load_file

from rag_persona.errors import RagPersonaError
from training.data.cpt_data import build_cpt_data
from training.recipes import CptRecipe, LoraRecipe, Recipe, load_recipe
from training.stages import train
from training.stages.common import RunOptions, begin, tokenized_examples
from training.stages.sft import add_replay_blocks, closed_book_rows, replay_count

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_forgetting", ROOT / "bench" / "forgetting.py")
fg = importlib.util.module_from_spec(_spec)
sys.modules["bench_forgetting"] = fg  # dataclasses look their module up there
_spec.loader.exec_module(fg)

FACTS = [
    {"id": "name", "text": "名前は小野寺絢音。", "questions": ["名前は何ですか"], "tags": ["profile"]},
    {"id": "age", "text": "年齢は17歳。", "questions": ["何歳ですか"], "tags": ["profile"]},
    {"id": "tea", "text": "好きな紅茶はダージリン。", "questions": ["好きな紅茶は"], "tags": ["likes"]},
    {"id": "piano", "text": "趣味はピアノ。", "questions": ["趣味は"], "tags": ["hobby"]},
]
PERSONA = {"id": "tiny", "name": "小野寺絢音", "reading": "おのでら あやね", "summary": "17歳のお嬢様。"}


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny untied Qwen2 (2 layers), a tiny persona folder and the chat rows of test_train."""
    return tiny_training_folders(
        tmp_path_factory.mktemp("forgetting"), FACTS, PERSONA, max_position_embeddings=1024
    )


def _sft(tiny, **kw) -> Recipe:
    kw.setdefault("lora", LoraRecipe(r=4, lora_alpha=8, target_modules=fg.MODULES["attn_mlp"]))
    return Recipe(
        name="tiny-sft",
        stage="sft",
        base_model=tiny.model,
        data_dir=str(tiny.data),
        train_file="sft.jsonl",
        max_steps=1,
        learning_rate=1e-2,
        cpt=CptRecipe(knowledge_dir=str(tiny.kb), block_size=32, variants=2),
        **kw,
    ).validate()


# -- the plan and the recipes -------------------------------------------------------------------------------


def test_the_plan_runs_cpt_128_its_cells_then_cpt_32_and_names_parse_back():
    names = [c.name for c in fg.default_plan()]
    assert names[:5] == [
        "cpt-alpha128",
        "cpt128-sft8-attn_mlp-s42",
        "cpt128-sft8-attn-s42",
        "cpt128-sft32-attn_mlp-s42",
        "cpt128-sft32-attn-s42",
    ]
    assert names[5:10] == [f"cpt128-sft32-attn_mlp-{m}-s42" for m in fg.MITIGATIONS]
    assert names[10] == "cpt-alpha32" and len([n for n in names if n.startswith("cpt32-")]) == 4
    assert names[-2:] == ["base", "base-sft32-attn_mlp-s42"] and len(set(names)) == len(names) == 17
    assert all(fg.parse_cell(n).name == n for n in names)
    # a chosen SFT cell brings its model cell first; --seeds adds the same cell with each other seed
    chosen = fg.plan(["cpt32-sft8-attn-replay30-s42"], seeds=[43, 42])
    assert [c.name for c in chosen] == [
        "cpt-alpha32",
        "cpt32-sft8-attn-replay30-s42",
        "cpt32-sft8-attn-replay30-s43",
    ]
    assert [c.name for c in fg.plan(None, mitigation_base="sft8-attn")][5] == "cpt128-sft8-attn-replay10-s42"
    for bad in ("cpt128-sft8-mlp-s42", "cpt128-sft8-attn-dropout-s42", "cpt128", "cpt128-sft0-attn-s42"):
        with pytest.raises(RagPersonaError, match=f"--cells: '{bad}' is not a cell name"):
            fg.parse_cell(bad)
    args = fg.parse_args(["--list"])
    rates = fg._measured({})
    minutes = {c.name: fg.estimate_minutes(c, args, rates) for c in fg.default_plan()}
    assert minutes["cpt-alpha128"] > minutes["cpt128-sft32-attn_mlp-replay30-s42"]
    assert minutes["cpt128-sft32-attn_mlp-replay30-s42"] > minutes["cpt128-sft32-attn_mlp-s42"] > 0


def test_cell_recipes_are_the_bundled_ones_with_only_the_cells_changes(tmp_path):
    cpt_base, sft_base = load_recipe(fg.CPT_RECIPE), load_recipe(fg.SFT_RECIPE)
    cpt = fg.cpt_recipe(32, threads=1)
    assert cpt.lora.lora_alpha == 32 and cpt.name == "cpt-alpha32" and cpt.cpu_threads == 1
    assert (cpt.num_train_epochs, cpt.lora.top_layers, cpt.cpt) == (3, 12, cpt_base.cpt)
    assert cpt.lora.target_modules == cpt_base.lora.target_modules and cpt.quantization == "none"

    grid = fg.sft_recipe(fg.parse_cell("cpt128-sft32-attn-s43"), tmp_path / "cpt", tmp_path / "data")
    assert (grid.lora.lora_alpha, grid.lora.target_modules, grid.seed) == (32, fg.ATTENTION, 43)
    assert grid.base_model == str(tmp_path / "cpt") and grid.learning_rate == sft_base.learning_rate
    assert grid.lora.top_layers == 12 and grid.replay == 0 and "cpt" not in grid.to_dict()

    layers = fg.sft_recipe(fg.parse_cell("cpt128-sft32-attn_mlp-layers0-11-s42"), "m", "d")
    assert layers.lora.top_layers is None and layers.lora.layers == list(range(12))
    assert fg.sft_recipe(fg.parse_cell("cpt128-sft8-attn_mlp-lr1e-4-s42"), "m", "d").learning_rate == 1e-4
    replay = fg.sft_recipe(fg.parse_cell("cpt128-sft32-attn_mlp-replay30-s42"), "m", "d")
    assert replay.replay == 0.3 and replay.cpt == cpt_base.cpt  # the documents the CPT model saw
    assert replay.to_dict()["cpt"] == cpt_base.to_dict()["cpt"]
    assert (replay_count(384, 0.1), replay_count(384, 0.3), replay_count(4, 0.01), replay_count(9, 0)) == (
        43,
        165,
        1,
        0,
    )


def test_recipe_fields_replay_and_layers_are_checked(tiny):
    with pytest.raises(
        RagPersonaError, match="field 'replay': a share in \\[0, 1\\), for the sft stage only"
    ):
        Recipe(name="x", stage="dpo", replay=0.2).validate()
    with pytest.raises(RagPersonaError, match="field 'replay'"):
        Recipe(name="x", stage="sft", replay=1.0).validate()
    with pytest.raises(RagPersonaError, match="field 'lora.layers': give either"):
        Recipe(name="x", stage="sft", lora=LoraRecipe(top_layers=2, layers=[0])).validate()
    with pytest.raises(RagPersonaError, match="field 'lora.layers': a non-empty list"):
        Recipe(name="x", stage="sft", lora=LoraRecipe(layers=[1, 1])).validate()
    with pytest.raises(RagPersonaError, match="field 'lora.layers': layer 5 is not one of the model's 2"):
        train(_sft(tiny, lora=LoraRecipe(r=4, layers=[5])), tiny.root / "bad", progress=_quiet, cuda=False)


# -- replay and layer choice on real rows ------------------------------------------------------------------


def test_replay_adds_the_cpt_blocks_to_the_real_sft_examples_at_the_share_asked(tiny):
    recipe = _sft(tiny, replay=0.3)
    run, data, loaded, eos_id, stops = begin(
        recipe, tiny.root / "unused", RunOptions(progress=_quiet, cuda=False)
    )
    ex = tokenized_examples(run, loaded.tokenizer, data, eos_id, stops, kind="sft")
    chat = [(e.input_ids, e.labels, s) for e, s in zip(ex.train.examples, ex.train.sources, strict=True)]
    assert len(chat) == 4
    added = add_replay_blocks(run, loaded.tokenizer, ex, eos_id, stops)
    assert added["replay_blocks"] == replay_count(4, 0.3) == 2 and added["replay_share"] == 0.3333
    blocks = build_cpt_data(
        loaded.tokenizer,
        eos_id,
        stops,
        knowledge_dir=tiny.kb,
        block_size=32,
        variants=2,
        eval_variants=0,
        seed=42,
    ).train
    mixed = list(zip(ex.train.examples, ex.train.sources, strict=True))
    replayed = [(e, s) for e, s in mixed if s.startswith("replay ")]
    assert len(mixed) == 6 and len(replayed) == 2
    # the chat rows are all still there, unchanged; the replayed ones are CPT blocks, every token trained
    assert sorted((e.input_ids, e.labels, s) for e, s in mixed if not s.startswith("replay ")) == sorted(chat)
    by_source = {s: e for e, s in zip(blocks.examples, blocks.sources, strict=True)}
    for e, s in replayed:
        assert e.input_ids == e.labels == by_source[s.removeprefix("replay ")].input_ids
        assert len(e.input_ids) == 32
    # the stage trains on the mix and records it
    out = tiny.root / "sft-replay"
    metrics = train(recipe, out, progress=_quiet, cuda=False)
    assert metrics["replay_blocks"] == 2 and metrics["train_examples"] == 6 and metrics["steps"] == 1
    sources = json.loads((out / "data_manifest.json").read_text())["train"]["sources"]
    assert len(sources) == 6 and sum(s.startswith("replay train block") for s in sources) == 2
    assert "cpt" in (out / "recipe.yaml").read_text()
    with pytest.raises(RagPersonaError, match="needs 996 CPT blocks, the knowledge gives"):
        train(_sft(tiny, replay=0.996), tiny.root / "too-much", progress=_quiet, cuda=False)


def test_closed_book_copies_fact_rows_about_untested_facts_without_their_context(tiny, tmp_path):
    from test_train import write_jsonl

    from rag_persona.prompts import Persona, build_messages

    kb = tmp_path / "kb"
    shutil.copytree(tiny.kb, kb)
    (kb / "queries").mkdir()
    write_jsonl(
        kb / "queries" / "test.jsonl",
        [{"query": "お名前は", "relevant": ["name"]}, {"query": "年は", "relevant": ["age"]}],
    )
    data = tmp_path / "data"
    data.mkdir()
    system = {"role": "system", "content": "あなたは小野寺絢音です。\n【情報】\n- 事実"}
    rows = [
        {
            "id": f"r{i}",
            "prompt": [system, {"role": "user", "content": f["questions"][0]}],
            "completion": [{"role": "assistant", "content": f["text"]}],
            "kind": "fact",
            "golden_ids": [f["id"]],
        }
        for i, f in enumerate(FACTS)
    ]
    mixed = rows[2] | {"id": "r4", "golden_ids": ["tea", "age"]}  # one tested fact: never closed-book
    write_jsonl(data / "sft.jsonl", [*rows, mixed])
    cpt = CptRecipe(knowledge_dir=str(kb), block_size=32, variants=2)
    recipe = Recipe(
        name="tiny-closed",
        stage="sft",
        base_model=tiny.model,
        data_dir=str(data),
        train_file="sft.jsonl",
        max_steps=1,
        learning_rate=1e-2,
        lora=LoraRecipe(r=4, lora_alpha=8, target_modules=fg.MODULES["attn_mlp"]),
        cpt=cpt,
        closed_book=1.0,
    ).validate()
    out = tmp_path / "sft-closed"
    metrics = train(recipe, out, progress=_quiet, cuda=False)
    # the tea and piano rows (facts no test query asks), again with the builder's prompt and no facts
    assert metrics["closed_book_rows"] == 2 and metrics["train_examples"] == 7
    assert sorted(metrics["closed_book_ids"]) == ["r2-closed", "r3-closed"]
    run, data_, _, _, _ = begin(recipe, tmp_path / "unused", RunOptions(progress=_quiet, cuda=False))
    persona = Persona.load(kb)
    for where, row in closed_book_rows(run, data_.train_rows):
        question = row["prompt"][-1]["content"]
        assert where.endswith("(closed-book)") and row["prompt"] == build_messages(persona, [], [], question)
        assert "事実" not in row["prompt"][0]["content"] and row["golden_ids"][0] in ("tea", "piano")
    sources = json.loads((out / "data_manifest.json").read_text())["train"]["sources"]
    assert sum(s.endswith("(closed-book)") for s in sources) == 2
    half = train(dataclasses_replace(recipe, closed_book=0.5), tmp_path / "half", progress=_quiet, cuda=False)
    assert half["closed_book_rows"] == 1
    with pytest.raises(
        RagPersonaError, match="field 'closed_book': a share in \\[0, 1\\], for the sft stage only"
    ):
        Recipe(name="x", stage="dpo", closed_book=0.5).validate()


def test_lora_layers_put_the_sft_adapter_on_the_chosen_layers_only(tiny):
    recipe = _sft(tiny, lora=LoraRecipe(r=4, lora_alpha=8, target_modules=fg.ATTENTION, layers=[0]))
    train(recipe, tiny.root / "sft-layer0", progress=_quiet, cuda=False)
    keys = load_file(tiny.root / "sft-layer0" / "adapter_model.safetensors")
    assert keys and all(".layers.0." in k for k in keys)
    assert {k.split(".")[-3] for k in keys} == set(fg.ATTENTION)


# -- the CPT model: kept adapter, re-merged ------------------------------------------------------------------


def test_the_kept_cpt_adapter_re_merges_into_the_same_model(tiny, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    recipe = Recipe(
        name="cpt-alpha7",
        stage="cpt",
        base_model=tiny.model,
        max_steps=1,
        learning_rate=1e-2,
        lora=LoraRecipe(r=4, lora_alpha=7, target_modules=["all-linear", "embed_tokens"], top_layers=1),
        cpt=CptRecipe(knowledge_dir=str(tiny.kb), block_size=32, variants=2),
    ).validate()
    train(recipe, runs / "cpt-alpha7", progress=_quiet, cuda=False)
    trained = load_file(runs / "cpt-alpha7" / "model.safetensors")
    assert fg.ensure_cpt_model(7, runs, results) == runs / "cpt-alpha7"  # present: kept, not retrained
    kept = results / "cpt-alpha7"
    assert sorted(p.name for p in kept.iterdir()) == [
        "adapter",
        "data_manifest.json",
        "metrics.json",
        "recipe.yaml",
    ]
    assert not list(kept.rglob("model*.safetensors")) and not list(kept.rglob("optimizer*"))
    shutil.rmtree(runs / "cpt-alpha7")
    assert fg.ensure_cpt_model(7, runs, results) == runs / "cpt-alpha7"
    again = load_file(runs / "cpt-alpha7" / "model.safetensors")
    assert set(again) == set(trained)
    assert all(torch.equal(again[k], trained[k]) for k in trained)
    base = load_file(Path(tiny.model) / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert not torch.equal(again[emb], base[emb].to(again[emb].dtype))
    assert (runs / "cpt-alpha7" / "remerged_from.json").is_file() and fg.adapter_l2(kept / "adapter") > 0


# -- skipping, budget, table ----------------------------------------------------------------------------------


def _result(cell: str, **kw) -> dict:
    """A result dict as run_cell writes it (numbers made up: for rendering only)."""
    c = fg.parse_cell(cell)

    def recall(acc, seen):
        return {
            "heldout": {"summary": {"accuracy": acc}, "questions": [{}] * 10},
            "seen": {"summary": {"accuracy": seen}, "questions": [{}] * 4},
        }

    out = {
        "cell": cell,
        "kind": c.kind,
        "wall_seconds": 600.0,
        "eval_seconds": 120.0,
        "l2": kw.get("l2", 0.5),
    }
    out["recall"] = recall(kw["acc"], kw.get("seen", 0.5))
    out["train"] = {"device": "cpu", "seconds_per_step": 4.0}
    if "dtype" in kw:
        out["train"]["base_dtype"] = kw["dtype"]
    if c.sft:
        out["persona"] = {
            "summary": {
                "style_rate": kw["style"],
                "eos_rate": kw["eos"],
                "median_chars": 27,
                "fact_accuracy": 0.5,
            },
            "replies": [{}] * 6,
        }
    return out


def _write(results: Path, result: dict) -> Path:
    path = results / result["cell"] / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result), encoding="utf-8")
    return path


def test_table_rows_from_results_pending_cells_and_the_goal(tmp_path):
    results = {
        "cpt-alpha128": _result("cpt-alpha128", acc=0.40, l2=3.0),
        "cpt128-sft8-attn_mlp-s42": _result("cpt128-sft8-attn_mlp-s42", acc=0.34, style=0.95, eos=1.0),
        "cpt128-sft32-attn_mlp-s42": _result("cpt128-sft32-attn_mlp-s42", acc=0.10, style=1.0, eos=1.0),
        "cpt128-sft8-attn_mlp-s43": _result(
            "cpt128-sft8-attn_mlp-s43", acc=0.30, style=0.85, eos=1.0, dtype="float32"
        ),
    }
    cells = fg.default_plan()
    md, data = fg.render_table(cells, results)
    rows = {r["cell"]: r for r in data["rows"]}
    assert len(rows) == 18  # the plan and the extra seed found among the results
    r = rows["cpt128-sft8-attn_mlp-s42"]
    assert (r["recall_after_cpt"], r["recall_after_sft"], r["drop"], r["kept"]) == (0.40, 0.34, 0.06, 0.85)
    assert (r["style"], r["eos"], r["rag_fact_accuracy"], r["wall_minutes"]) == (0.95, 1.0, 0.5, 10.0)
    assert rows["cpt128-sft32-attn_mlp-s42"]["kept"] == 0.25 and rows["cpt-alpha32"]["status"] == "pending"
    # "ran on": device and base dtype (results from before the CPU dtype rule were all bf16 bases)
    assert r["device"] == "cpu bf16" and rows["cpt128-sft8-attn_mlp-s43"]["device"] == "cpu float32"
    assert "| cpt128-sft8-attn_mlp-s42 | 128 | 8 | attention+MLP | – | 42 | 0.40 | 0.34 | 0.06 | 0.85 |" in md
    assert "| cpt-alpha32 | 32 | – | – | – | – | pending |" in md
    assert "4 of 18 cells measured." in md
    assert "Goal (kept ≥ 80% of recall after CPT, style ≥ 0.90, EOS 1.00): cpt128-sft8-attn_mlp-s42." in md
    png = fg.plot(data["rows"], tmp_path / "forgetting.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_finished_cells_are_skipped_and_the_budget_stops_new_ones(tmp_path, capsys):
    results, out = tmp_path / "results", tmp_path / "forgetting.md"
    done = _write(results, _result("base", acc=0.01))
    before = done.read_text()
    common = ["--results", str(results), "--runs", str(tmp_path / "runs"), "--out", str(out)]
    common += ["--data", str(tmp_path / "data")]
    assert fg.main(["--cells", "base", *common]) == 0
    assert done.read_text() == before and "cell base: done, skipped" in capsys.readouterr().err
    assert "| base | – | – |" in out.read_text() and out.with_suffix(".json").is_file()
    # the table is the whole plan even when one cell was asked for
    assert "| cpt-alpha32 | 32 | – | – | – | – | pending |" in out.read_text()
    assert "1 of 17 cells measured." in out.read_text()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    # a pending cell after the budget: nothing starts, the table lists it as pending
    assert fg.main(["--cells", "base-sft32-attn_mlp-s42", "--budget-minutes", "0", *common]) == 0
    err = capsys.readouterr().err
    assert "budget of 0 min reached; not started: base-sft32-attn_mlp-s42" in err
    assert not (results / "base-sft32-attn_mlp-s42").exists() and not (tmp_path / "data").exists()
    assert "| base-sft32-attn_mlp-s42 | – | 32 | attention+MLP | – | 42 | pending |" in out.read_text()
    fg.main(["--list", *common])
    listed = capsys.readouterr().out
    assert re.search(r"^base +10 min  done$", listed, re.M)
    assert "cpt-alpha128" in listed and "17 cells, 1 done" in listed


def test_text_nll_is_the_models_own_language_modelling_loss(tiny):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.recall import text_nll

    model = AutoModelForCausalLM.from_pretrained(tiny.model)
    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    texts = [f["text"] for f in FACTS]
    got = text_nll(SimpleNamespace(model=model, tokenizer=tokenizer), texts)
    losses, counts = [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=ids).loss))
        counts.append(ids.shape[1] - 1)
    expected = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    assert got["tokens"] == sum(counts) and got["nll"] == pytest.approx(expected, abs=1e-4)


def test_nll_kept_compares_the_cell_with_the_base_and_its_cpt_model(tmp_path):
    def probe(injected, control):
        return {"injected": {"nll": injected}, "control": {"nll": control}}

    results = {
        "cpt-alpha128": _result("cpt-alpha128", acc=0.40) | {"probe": probe(1.0, 3.0)},
        "cpt128-sft8-attn_mlp-s42": _result("cpt128-sft8-attn_mlp-s42", acc=0.1, style=1.0, eos=1.0)
        | {"probe": probe(1.5, 3.2)},
    }
    (tmp_path / fg.BASE_PROBE).write_text(json.dumps(probe(3.0, 3.1)), encoding="utf-8")
    args = fg.parse_args(["--results", str(tmp_path)])
    _, data = fg.render_table(fg.default_plan(), results, args)
    rows = {r["cell"]: r for r in data["rows"]}
    sft = rows["cpt128-sft8-attn_mlp-s42"]
    assert (sft["fact_nll"], sft["nll_kept"], sft["control_drift"]) == (1.5, 0.75, 0.1)
    # fact gain beyond the control's: ((3.0 - 1.5) - (3.1 - 3.2)) / ((3.0 - 1.0) - (3.1 - 3.0)) = 1.6 / 1.9
    assert sft["nll_kept_corrected"] == round(1.6 / 1.9, 3)
    assert rows["cpt-alpha128"]["nll_kept"] is None and rows["cpt-alpha128"]["fact_nll"] == 1.0


def test_a_resumed_runs_step_time_counts_only_the_steps_it_ran():
    # The Trainer's train_runtime after a resume covers steps 225..288; the first 225 ran in an earlier session.
    metrics = {"steps": 288, "resumed_from_step": 225, "seconds": 1317.0, "train": {"train_runtime": 1228.8}}
    record = fg._train_record(metrics)
    assert record["seconds_per_step"] == round(1228.8 / 63, 2)
    assert record["resumed_from_step"] == 225
    assert record["seconds"] == round(1317.0 + record["seconds_per_step"] * 225, 1)
    fresh = fg._train_record({"steps": 288, "seconds": 5700.0, "train": {"train_runtime": 5616.0}})
    assert (fresh["seconds_per_step"], fresh["seconds"], fresh["resumed_from_step"]) == (19.5, 5700.0, 0)
