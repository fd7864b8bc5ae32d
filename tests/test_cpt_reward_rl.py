"""CPT, reward model and GRPO on tiny random Qwen2 models: what trains, what merges, what each reward gives."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_qwen2, tiny_training_folders
from safetensors.torch import load_file
from test_train import write_jsonl
from typer.testing import CliRunner

from rag_persona.errors import RagPersonaError
from rag_persona.generation import compute_dtype
from training.data.cpt_data import Document, build_cpt_data, pack, render_documents
from training.data.labels import IGNORE
from training.recipes import CptRecipe, LoraRecipe, Recipe, RlRecipe, load_recipe
from training.stages import train
from training.stages.rewards import (
    EosReward,
    LengthReward,
    StyleReward,
    build_rewards,
    eos_score,
    length_score,
)

FACTS = [
    {"id": "name", "text": "名前は小野寺絢音。", "questions": ["名前は何ですか"], "tags": ["profile"]},
    {"id": "age", "text": "年齢は17歳。", "questions": ["何歳ですか"], "tags": ["profile"]},
    {"id": "tea", "text": "好きな紅茶はダージリン", "questions": ["好きな紅茶は"], "tags": ["likes"]},
    {"id": "piano", "text": "趣味はピアノ。", "tags": ["hobby"]},
]
PERSONA = {"id": "tiny", "name": "小野寺絢音", "reading": "おのでら あやね", "summary": "17歳のお嬢様。"}
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny tied-embedding Qwen2 (like the bundled 0.5B), a tiny persona folder, SFT and DPO files."""
    return tiny_training_folders(
        tmp_path_factory.mktemp("cpt_rl"),
        FACTS,
        PERSONA,
        kb="knowledge/tiny",
        background="# 生い立ち\n\n鎌倉山の洋館で育った。\n\n祖母にピアノを習った。\n",
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )


def _recipe(setup, stage, **kw):
    files = {"cpt": "sft.jsonl", "reward": "dpo.jsonl", "rl": "sft.jsonl", "sft": "sft.jsonl"}
    kw.setdefault("max_steps", 1)
    kw.setdefault("learning_rate", 1e-2)
    return Recipe(
        name=f"tiny-{stage}",
        stage=stage,
        base_model=kw.pop("base_model", setup.model),
        data_dir=str(setup.data),
        train_file=kw.pop("train_file", files[stage]),
        **kw,
    ).validate()


def _base_weights(folder, dtype=None) -> dict[str, torch.Tensor]:
    """Saved weights as the CPU base holds them (its compute dtype; in float32 for exact comparisons)."""
    dtype = dtype or compute_dtype("cpu")
    return {k: v.to(dtype).float() for k, v in load_file(folder / "model.safetensors").items()}


# -- CPT data ---------------------------------------------------------------------------------------------


def test_cpt_blocks_are_packed_with_eos_between_documents_and_every_label_trained(setup):
    tok = setup.tok
    eos = tok.eos_token_id
    data = build_cpt_data(
        tok, eos, {eos}, knowledge_dir=setup.kb, block_size=64, variants=2, eval_variants=1, seed=3
    )
    blocks = [ex.input_ids for ex in data.train.examples]
    assert blocks and all(len(b) == 64 for b in blocks)
    assert all(ex.labels == ex.input_ids and IGNORE not in ex.labels for ex in data.train.examples)
    # The stream is the documents, each followed by exactly one EOS id, in order.
    docs = []
    for v in range(2):
        from rag_persona.knowledge.facts import load_knowledge
        from rag_persona.prompts import Persona
        from training.data.cpt_data import background_documents

        docs += render_documents(
            load_knowledge(setup.kb).facts,
            Persona.load(setup.kb),
            variant=v,
            seed=3,
            background=background_documents(setup.kb / "background.md"),
        )
    expected = [t for d in docs for t in [*tok(d.text, add_special_tokens=False)["input_ids"], eos]]
    stream = [t for b in blocks for t in b]
    assert stream == expected[: len(stream)] and len(expected) - len(stream) == data.dropped_tail_tokens < 64
    assert expected.count(eos) == len(docs) == data.documents
    text = tok.decode(expected)
    assert "鎌倉山の洋館で育った" in text and "ダージリン。" in text  # background file, and a period added
    assert "問：" in text  # the qa rendering puts a fact after one of its questions
    assert data.eval is not None and data.eval.examples[0].input_ids != blocks[0]
    assert render_documents(load_knowledge(setup.kb).facts, Persona.load(setup.kb), variant=0, seed=3) == (
        render_documents(load_knowledge(setup.kb).facts, Persona.load(setup.kb), variant=0, seed=3)
    )


def test_pack_drops_the_short_tail_and_cpt_refuses_special_token_text(setup, tmp_path):
    blocks, dropped = pack([[1, 2, 3, 9], [4, 5, 9]], 3)
    assert blocks == [[1, 2, 3], [9, 4, 5]] and dropped == 1
    kb = tmp_path / "kb"
    kb.mkdir()
    write_jsonl(kb / "facts.jsonl", FACTS)
    (kb / "persona.json").write_text(json.dumps(PERSONA, ensure_ascii=False), encoding="utf-8")
    (kb / "notes.txt").write_text("終わりの印は</s>ではありません。<|im_end|>\n", encoding="utf-8")
    eos = setup.tok.eos_token_id
    with pytest.raises(RagPersonaError, match="notes.txt:1: CPT train labels fail the audit"):
        build_cpt_data(setup.tok, eos, {eos}, knowledge_dir=kb, block_size=16)
    assert Document("a", "b") == Document("a", "b")


# -- CPT training -----------------------------------------------------------------------------------------


def test_top_layers_keep_the_embedding_lora_outside_the_decoder_layers(setup):
    from transformers import AutoModelForCausalLM

    from training.stages.lora import lora_config

    model = AutoModelForCausalLM.from_pretrained(setup.model)
    recipe = _recipe(
        setup, "cpt", lora=LoraRecipe(target_modules=["all-linear", "embed_tokens"], top_layers=1)
    )
    cfg = lora_config(recipe, model)
    names = set(cfg.target_modules)
    assert "model.embed_tokens" in names and cfg.layers_to_transform is None
    assert len(names) == 1 + len(ATTN_MLP)
    assert all(".layers.1." in n for n in names - {"model.embed_tokens"})


@pytest.fixture(scope="module")
def cpt_run(setup):
    recipe = _recipe(
        setup,
        "cpt",
        lora=LoraRecipe(r=4, lora_alpha=128, target_modules=[*ATTN_MLP, "embed_tokens", "lm_head"]),
        cpt=CptRecipe(knowledge_dir=str(setup.kb), block_size=32, variants=2),
        max_eval_examples=4,
    )
    return train(recipe, setup.root / "cpt", progress=_quiet, cuda=False)


def test_one_cpt_step_changes_only_lora_targets_and_the_merge_is_base_plus_delta(setup, cpt_run):
    out = setup.root / "cpt"
    assert cpt_run["steps"] == 1 and cpt_run["untied_embeddings"] and cpt_run["merged"]
    # The merged folder is saved in bf16 like a prepared base: compare in bf16.
    base = _base_weights(setup.root / "tiny", torch.bfloat16)
    merged = _base_weights(out, torch.bfloat16)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    assert "lm_head.weight" not in base  # tied in the base: saved once
    base["lm_head.weight"] = base["model.embed_tokens.weight"]
    deltas = {}
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace(".lora_A.", ".lora_B.")].float()
            deltas[key.split("base_model.model.")[1].split(".lora_A.")[0] + ".weight"] = b @ a.float() * scale
        elif "lora_embedding_A" in key:
            b = adapter[key.replace("lora_embedding_A", "lora_embedding_B")].float()
            deltas[key.split("base_model.model.")[1].split(".lora_embedding_A")[0] + ".weight"] = (
                b @ a.float()
            ).T * scale
    assert "model.embed_tokens.weight" in deltas and "lm_head.weight" in deltas
    assert any("mlp.down_proj" in k for k in deltas) and any("self_attn.q_proj" in k for k in deltas)
    assert set(merged) == set(base)
    for name, weight in base.items():
        expected = weight + deltas[name] if name in deltas else weight
        # The merge adds the fp32 delta into the base (fp32 or bf16), saved as bf16: equal up to bf16 rounding.
        torch.testing.assert_close(merged[name], expected.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
        if name not in deltas:
            assert torch.equal(merged[name], weight), f"{name} is not a LoRA target but changed"
        else:
            assert deltas[name].abs().max() > 0, f"{name}: LoRA delta did not move after one step"
    folder_config = json.loads((out / "config.json").read_text())
    assert folder_config["tie_word_embeddings"] is False
    for name in ("tokenizer_config.json", "recipe.yaml", "metrics.json", "data_manifest.json", "loss.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["train_blocks"] >= 1 and manifest["label_audit"]["failed"] == 0
    assert "eval_before" in cpt_run and "eval_after" in cpt_run


def test_sft_trains_a_differently_shaped_lora_on_the_cpt_model(setup, cpt_run):
    recipe = _recipe(
        setup,
        "sft",
        base_model=cpt_run["output"],
        lora=LoraRecipe(r=4, lora_alpha=8, target_modules=ATTN_MLP),
    )
    run = train(recipe, setup.root / "sft-after-cpt", progress=_quiet, cuda=False, keep_model=True)
    names = [n for n, _ in run["model"].named_parameters() if "lora_" in n]
    assert names and not any("embed_tokens" in n or "lm_head" in n for n in names)
    cfg = json.loads((setup.root / "sft-after-cpt" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == cpt_run["output"]


# -- rewards ----------------------------------------------------------------------------------------------


def test_rule_based_rewards_on_hand_written_completions():
    thirty = "ごきげんよう、わたくし小野寺絢音と申します。お会いできて光栄ですわ"[:30]
    assert len(thirty) == 30
    assert length_score(thirty) == 1.0
    assert length_score("あ" * 45) == 0.0 and length_score("あ" * 15) == 0.0
    assert length_score("あ" * 38) == pytest.approx(1 - 8 / 15)
    assert length_score("あ" * 90) == -1.0 and length_score("") == -1.0
    assert length_score("あ い う") == length_score("あいう")  # whitespace does not count
    eos = {7, 9}
    assert eos_score([5, 6, 7], eos) == 1.0
    assert eos_score([5, 6, 8], eos) == -1.0  # ran into the length limit
    assert eos_score([], eos) == -1.0
    assert eos_score([5, 9], eos, "お会いできて嬉しいですわ</s>") == -1.0  # printed the EOS as text
    msgs = [[{"role": "assistant", "content": t}] for t in ("ごきげんよう、嬉しいですわ。", "こんにちは。")]
    assert StyleReward()(None, msgs) == [1.0, 0.0]
    # 14 and 6 characters against a target of 14 ± 5
    assert LengthReward(target=14, tolerance=5)(None, msgs) == [1.0, pytest.approx(1 - 8 / 5)]
    assert EosReward(eos)(None, msgs, completion_ids=[[1, 7], [1, 2]]) == [1.0, -1.0]
    funcs, weights = build_rewards({"length": 0.5, "eos": 1.0, "style": 0.0}, eos_ids=eos)
    assert [f.__name__ for f in funcs] == ["length", "eos"] and weights == [0.5, 1.0]


# -- reward model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_run(setup):
    recipe = _recipe(
        setup,
        "reward",
        eval_file="dpo.jsonl",
        lora=LoraRecipe(r=4, lora_alpha=8),
        per_device_train_batch_size=2,
    )
    return train(recipe, setup.root / "reward", progress=_quiet, cuda=False, keep_model=True)


def test_one_reward_step_changes_only_lora_and_the_score_head(setup, reward_run):
    base = _base_weights(setup.root / "tiny")
    changed_score = False
    lora = []
    for name, p in reward_run["model"].named_parameters():
        if "lora_" in name:
            lora.append(p)
            continue
        if "score" in name:
            if "modules_to_save" in name:
                assert p.requires_grad
                original = dict(reward_run["model"].named_parameters())[
                    name.replace("modules_to_save.default", "original_module")
                ]
                changed_score = changed_score or not torch.equal(p, original)
            continue
        plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert not p.requires_grad, name
        assert torch.equal(p.float(), base[plain]), f"base weight {plain} changed"
    assert changed_score, "the score head must train"
    assert any(p.abs().sum() > 0 for n, p in reward_run["model"].named_parameters() if "lora_B" in n)
    saved = load_file(setup.root / "reward" / "adapter_model.safetensors")
    assert any("score" in k for k in saved) and any("lora_A" in k for k in saved)
    assert reward_run["heldout_before"]["pairs"] == 4 and reward_run["heldout_after"]["accuracy"] is not None
    assert reward_run["pad_id"] != reward_run["eos_id"]
    metrics = json.loads((setup.root / "reward" / "metrics.json").read_text())
    assert "heldout_after" in metrics and metrics["stage"] == "reward"


def test_reward_model_ranks_chosen_over_rejected_after_a_short_run_on_the_bundled_data(
    tmp_path, bundled_model_dir
):
    """Knowledge DPO pairs built from the bundled persona; a tiny random Qwen2 with the bundled tokenizer."""
    from transformers import AutoTokenizer

    from rag_persona.retrieval.store import build_index
    from rag_persona.settings import KNOWLEDGE_ROOT
    from training.data.build import DataConfig, build_datasets

    build_index(KNOWLEDGE_ROOT / "ojousama", tmp_path / "index")
    build_datasets(DataConfig(out=tmp_path / "data", index=tmp_path / "index", seed=0))
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    model = make_tiny_qwen2(tok, max_position_embeddings=2048)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(tmp_path / "tiny-qwen", safe_serialization=True)
    tok.save_pretrained(tmp_path / "tiny-qwen")
    recipe = Recipe(
        name="rm-bundled",
        stage="reward",
        base_model=str(tmp_path / "tiny-qwen"),
        data_dir=str(tmp_path / "data"),
        train_file="dpo_d1_train.jsonl",
        eval_file="dpo_d1_eval.jsonl",
        max_train_examples=96,
        max_eval_examples=32,
        lora=LoraRecipe(r=8, lora_alpha=16, lora_dropout=0.0),
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        num_train_epochs=1,
        per_device_train_batch_size=4,
        seed=0,
    ).validate()
    run = train(recipe, tmp_path / "rm", progress=_quiet, cuda=False)
    assert run["eos_token"] == "<|im_end|>" and run["pad_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert run["heldout_after"]["pairs"] == 32
    # Measured with seed 0: 0.50 before, 0.97 after 24 steps of 4 pairs.
    after, before = run["heldout_after"]["accuracy"], run["heldout_before"]["accuracy"]
    assert after >= 0.75 and after >= before + 0.2, (before, after)


# -- RL ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_adapter(setup):
    recipe = _recipe(setup, "sft", lora=LoraRecipe(r=4, lora_alpha=8, target_modules=ATTN_MLP))
    return train(recipe, setup.root / "sft", progress=_quiet, cuda=False)["output"]


def test_one_grpo_step_changes_only_lora_weights(setup, sft_adapter, reward_run):
    recipe = _recipe(
        setup,
        "rl",
        init_adapter=sft_adapter,
        eval_file="sft.jsonl",
        max_eval_examples=2,
        per_device_train_batch_size=4,
        beta=0.05,
        rl=RlRecipe(
            num_generations=2,
            max_completion_length=8,
            reward_adapter=reward_run["output"],
            reward_weights={"reward_model": 1.0, "length": 0.5, "eos": 1.0, "style": 0.5},
            length_target=10,
            length_tolerance=5,
        ),
    )
    before = load_file(setup.root / "sft" / "adapter_model.safetensors")
    run = train(recipe, setup.root / "rl", progress=_quiet, cuda=False, keep_model=True)
    assert run["steps"] == 1
    base = _base_weights(setup.root / "tiny")
    base.setdefault("lm_head.weight", base["model.embed_tokens.weight"])
    for name, p in run["model"].named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(p.float(), base[plain]), f"base weight {plain} changed"
    after = load_file(setup.root / "rl" / "adapter_model.safetensors")
    assert set(after) == set(before), "the RL adapter is the SFT adapter continued (no 'ref' copy saved)"
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert set(run["rewards"]) == {"reward_model", "length", "eos", "style"}
    assert run["reward_first_step"] is not None and "group mean" in run["baseline"]
    assert {"length", "eos", "style", "reward_model", "weighted_sum"} <= set(run["eval_after"])
    history = json.loads((setup.root / "rl" / "log_history.json").read_text())
    assert any("rewards/eos/mean" in h for h in history)


def test_train_cli_dispatches_the_new_stages(setup, tmp_path):
    from rag_persona.cli.app import app

    recipe = tmp_path / "rm.yaml"
    recipe.write_text(
        f"name: cli-rm\nstage: reward\nbase_model: {setup.model}\ndata_dir: {setup.data}\n"
        "train_file: dpo.jsonl\neval_file: dpo.jsonl\nlearning_rate: 1.0e-3\n"
    )
    res = CliRunner().invoke(
        app, ["train", "reward", "--recipe", str(recipe), "--out", str(tmp_path / "rm"), "--max-steps", "1"]
    )
    assert res.exit_code == 0, res.output
    assert (
        "held-out pair accuracy" in res.stdout and (tmp_path / "rm" / "adapter_model.safetensors").is_file()
    )


# -- failing input ----------------------------------------------------------------------------------------


def test_stage_mismatch_and_missing_reward_adapter_are_one_line_errors(setup, tmp_path):
    from rag_persona.cli.app import app

    recipe = tmp_path / "rl.yaml"
    recipe.write_text(
        f"name: x\nstage: rl\nbase_model: {setup.model}\ndata_dir: {setup.data}\ntrain_file: sft.jsonl\n"
        "per_device_train_batch_size: 2\nbeta: 0.1\nrl: {reward_adapter: "
        + str(tmp_path / "no-such-rm")
        + "}\n"
    )
    runner = CliRunner()
    wrong = runner.invoke(app, ["train", "reward", "--recipe", str(recipe)])
    assert wrong.exit_code == 2 and "field 'stage' is 'rl'" in wrong.output
    missing = runner.invoke(app, ["train", "rl", "--recipe", str(recipe)])
    assert missing.exit_code == 2
    assert "no-such-rm: not a reward adapter folder" in missing.output
    with pytest.raises(RagPersonaError, match="rl.reward_adapter': missing"):
        Recipe(name="x", stage="rl", rl=RlRecipe(reward_adapter=None)).validate()
    with pytest.raises(RagPersonaError, match="field 'beta': must be positive"):
        Recipe(name="x", stage="rl", beta=0, rl=RlRecipe(reward_weights={"length": 1.0})).validate()
    with pytest.raises(RagPersonaError, match="multiple of rl.num_generations"):
        Recipe(
            name="x", stage="rl", per_device_train_batch_size=3, rl=RlRecipe(reward_weights={"eos": 1.0})
        ).validate()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstage: cpt\ncpt: {formats: [poetry]}\n")
    with pytest.raises(RagPersonaError, match="bad.yaml: field 'cpt.formats'"):
        load_recipe(bad)
    bad.write_text("name: x\nstage: reward\ninit_adapter: runs/sft\n")
    with pytest.raises(RagPersonaError, match="field 'init_adapter'"):
        load_recipe(bad)


# -- recipes and fact recall ----------------------------------------------------------------------------------


def test_bundled_recipes_follow_the_users_cpt_then_sft_settings():
    cpt7 = load_recipe("cpt-7b-qlora")
    assert cpt7.stage == "cpt" and cpt7.lora.lora_alpha == 128
    assert {"embed_tokens", "lm_head", "all-linear"} <= set(cpt7.lora.target_modules)
    cpt05 = load_recipe("cpt-0.5b-cpu")
    assert (
        cpt05.stage == "cpt" and "embed_tokens" in cpt05.lora.target_modules and cpt05.cpt.block_size == 256
    )
    after = load_recipe("sft-after-cpt-0.5b-cpu")
    assert after.stage == "sft" and after.lora.lora_alpha == 8 and after.base_model == "runs/cpt-0.5b-cpu"
    assert set(after.lora.target_modules) == set(ATTN_MLP)
    assert (
        load_recipe("reward-0.5b-cpu").stage == "reward" and load_recipe("reward-7b-qlora").stage == "reward"
    )
    rl = load_recipe("rl-0.5b-cpu")
    assert rl.stage == "rl" and rl.beta > 0 and rl.init_adapter and rl.rl.reward_adapter
    assert load_recipe("rl-7b-qlora").stage == "rl"


def test_fact_recall_asks_each_facts_questions_without_context(setup):
    from rag_persona.cli.app import app

    res = CliRunner().invoke(
        app,
        [
            "fact-recall",
            "--model",
            setup.model,
            "--knowledge",
            str(setup.kb),
            "--n",
            "2",
            "--max-new-tokens",
            "4",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    questions = report["questions"]
    assert {q["fact_id"] for q in questions} <= {"name", "age", "tea"}  # facts with questions only
    assert len({q["fact_id"] for q in questions}) == 2
    assert all("reply" in q and "correct" in q and "context" not in q for q in questions)
    assert report["summary"]["questions"] == len(questions) and 0 <= report["summary"]["accuracy"] <= 1
    assert report["setup"]["retrieval"] is False


def test_fact_recall_scores_a_reply_that_states_the_fact(setup):
    from training.recall import score_reply

    fact = {"id": "age", "text": "年齢は17歳。"}
    assert score_reply(fact["id"], fact["text"], "何歳ですか", "わたくしは17歳ですわ。", ["小野寺絢音"])
    assert not score_reply(fact["id"], fact["text"], "何歳ですか", "秘密ですわ。", ["小野寺絢音"])
