"""SFT and DPO through trl on a tiny random model: only LoRA weights move, EOS labels hold, runs are seeded."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from conftest import make_tiny_qwen2, make_tokenizer
from safetensors.torch import load_file
from typer.testing import CliRunner

from rag_persona.errors import RagPersonaError
from rag_persona.generation import compute_dtype
from training.recipes import RECIPES_DIR, LoraRecipe, Recipe, load_recipe
from training.shipping import ship_adapter
from training.stages import train
from training.stages.common import pick_mode

SYSTEM = {"role": "system", "content": "あなたは小野寺絢音です。お嬢様言葉で話します。"}
QA = [
    ("名前は？", "小野寺絢音ですわ。", "小野寺絢音です。"),
    ("趣味は？", "ピアノと乗馬ですわ。", "ピアノと乗馬です。"),
    ("こんにちは", "ごきげんよう、お会いできて嬉しいですわ。", "こんにちは、会えて嬉しいです。"),
    ("紅茶は好き？", "ええ、ダージリンが大好きですの。", "はい、ダージリンが好きです。"),
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")


def write_chat_data(data) -> None:
    """data/sft.jsonl and data/dpo.jsonl: four persona turns, the お嬢様 answer chosen over the plain one."""
    data.mkdir()
    prompts = [[SYSTEM, {"role": "user", "content": q}] for q, _, _ in QA]
    write_jsonl(
        data / "sft.jsonl",
        [
            {"prompt": p, "completion": [{"role": "assistant", "content": a}], "style": "ojousama"}
            for p, (_, a, _) in zip(prompts, QA, strict=True)
        ],
    )
    write_jsonl(
        data / "dpo.jsonl",
        [
            {
                "prompt": p,
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": b}],
            }
            for p, (_, a, b) in zip(prompts, QA, strict=True)
        ],
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen2 whose tokenizer splits the EOS text "</s>", plus SFT and DPO files."""
    root = tmp_path_factory.mktemp("train")
    tok = make_tokenizer("</s>", split_eos_text=True)
    model = make_tiny_qwen2(tok)
    model.save_pretrained(root / "tiny", safe_serialization=True)
    tok.save_pretrained(root / "tiny")
    data = root / "data"
    write_chat_data(data)
    write_jsonl(data / "text.jsonl", [{"text": f"{q} {a}</s>"} for q, a, _ in QA])
    dtype = compute_dtype("cpu")  # as the CPU base holds them
    base = {k: v.to(dtype) for k, v in load_file(root / "tiny" / "model.safetensors").items()}
    return types.SimpleNamespace(
        root=root, model=str(root / "tiny"), data=data, base=base, eos=tok.eos_token_id
    )


def _recipe(setup, stage, **kw):
    files = {"sft": "sft.jsonl", "dpo": "dpo.jsonl"}
    return Recipe(
        name=f"tiny-{stage}",
        stage=stage,
        base_model=setup.model,
        data_dir=str(setup.data),
        train_file=files[stage],
        eval_file=kw.pop("eval_file", None),
        max_steps=kw.pop("max_steps", 1),
        learning_rate=1e-3,
        **kw,
    )


def _split(model):
    """(base weights by their plain name, LoRA weights by name) of a peft model."""
    base, lora = {}, {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            lora[name] = p.detach().clone()
        else:
            plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            base[plain] = p.detach().clone()
    return base, lora


def _assert_base_untouched(setup, model):
    base, lora = _split(model)
    assert lora, "no LoRA weights"
    assert set(base) == set(setup.base)
    for name, original in setup.base.items():
        assert torch.equal(base[name], original), f"base weight {name} changed"
    return lora


@pytest.fixture(scope="module")
def sft_run(setup):
    return train(
        _recipe(setup, "sft", eval_file="sft.jsonl"),
        setup.root / "sft",
        progress=lambda m: None,
        keep_model=True,
        cuda=False,
    )


def test_one_sft_step_changes_only_lora_weights(setup, sft_run):
    lora = _assert_base_untouched(setup, sft_run["model"])
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b), "lora_B starts at zero and must move after one step"
    assert sft_run["steps"] == 1
    assert sft_run["mode"]["method"] == "LoRA" and sft_run["mode"]["device"] == "cpu"
    assert sft_run["label_audit"] == {"checked": 4, "failed": 0}
    assert sft_run["eos_id"] == setup.eos


def test_one_dpo_step_after_sft_changes_only_lora_weights(setup, sft_run):
    before = {k: v for k, v in load_file(setup.root / "sft" / "adapter_model.safetensors").items()}
    run = train(
        _recipe(setup, "dpo", init_adapter=str(setup.root / "sft")),
        setup.root / "dpo",
        progress=lambda m: None,
        keep_model=True,
        cuda=False,
    )
    _assert_base_untouched(setup, run["model"])
    after = load_file(setup.root / "dpo" / "adapter_model.safetensors")
    assert set(after) == set(before), "the DPO adapter is the SFT adapter continued (no 'ref' copy saved)"
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert run["lineage"]["metrics"]["stage"] == "sft"
    assert run["label_audit"] == {"checked": 8, "failed": 0}
    shipped = ship_adapter(setup.root / "dpo", setup.root / "shipped-dpo")
    info = json.loads((shipped / "rag_persona_adapter.json").read_text())
    assert info["stages"] == ["sft:tiny-sft", "dpo:tiny-dpo"]
    assert (shipped / "lineage" / "sft-tiny-sft" / "recipe.yaml").is_file()
    assert (shipped / "lineage" / "sft-tiny-sft" / "loss.png").is_file()


def test_dpo_from_scratch_uses_a_fresh_lora_and_rpo_loss(setup):
    recipe = _recipe(
        setup,
        "dpo",
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 1.0],
        eos_contrast=0.5,
        parrot_contrast=0.5,
    )
    run = train(recipe, setup.root / "dpo-fresh", progress=lambda m: None, keep_model=True, cuda=False)
    _assert_base_untouched(setup, run["model"])
    assert run["eos_contrast_pairs"] == 2 and run["parrot_contrast_pairs"] == 2
    assert run["label_audit"] == {"checked": 8, "failed": 0}
    assert run["train_loss"] > 0.6931  # the NLL term is added to the DPO loss (log 2 at the first step)


def test_adapter_folder_holds_provenance(setup, sft_run):
    out = setup.root / "sft"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "data_manifest.json",
        "metrics.json",
        "loss.png",
        "log_history.json",
    ):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["train"]["used"] == 4 and len(manifest["train"]["sha256"]) == 64
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"]["method"] == "LoRA" and "eval_after" in metrics and metrics["versions"]["trl"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert load_recipe(out / "recipe.yaml").seed == 42
    assert not list(setup.root.glob(".sft.tmp-*")), "no half-written folder left behind"


def test_same_seed_same_adapter(setup, sft_run):
    again = train(
        _recipe(setup, "sft", eval_file="sft.jsonl"),
        setup.root / "sft-again",
        progress=lambda m: None,
        cuda=False,
    )
    a = load_file(setup.root / "sft" / "adapter_model.safetensors")
    b = load_file(setup.root / "sft-again" / "adapter_model.safetensors")
    assert again["steps"] == 1
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_run_resumes_from_its_checkpoint(setup):
    """Stopped after step 3 of 4 (checkpoint at 2): the same command again resumes at step 2, reads the
    held-out metrics before training back instead of measuring them again, and ends with the adapter of a
    run never interrupted; a changed recipe discards the checkpoints instead."""

    class Stop(Exception):
        pass

    def stop_at_step_3(msg: str) -> None:
        if msg.startswith("step 3/"):
            raise Stop

    recipe = lambda **kw: _recipe(  # noqa: E731
        setup, "sft", max_steps=4, save_steps=2, logging_steps=1, eval_file="sft.jsonl", **kw
    )
    out = setup.root / "sft-resumed"
    with pytest.raises(Stop):
        train(recipe(), out, progress=stop_at_step_3, cuda=False)
    checkpoints = setup.root / ".sft-resumed.checkpoints"
    assert not out.exists() and (checkpoints / "checkpoint-2" / "adapter_model.safetensors").is_file()
    kept_before = json.loads((checkpoints / "eval_before.json").read_text())
    # a save cut short (no trainer_state.json, which is written last) is dropped, not resumed from
    (checkpoints / "checkpoint-3").mkdir()
    (checkpoints / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"partial")

    lines: list[str] = []  # resumed with another thread count: the same run
    metrics = train(recipe(cpu_threads=1), out, progress=lines.append, cuda=False)
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 4
    logged = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert len(logged) == 4 and metrics["train_loss"] == pytest.approx(sum(logged) / 4)
    assert any(line.startswith("resuming from") for line in lines)
    assert any("read back" in line for line in lines)
    assert not any(line.startswith("evaluating on") for line in lines), "measured once per run"
    assert metrics["eval_before"] == kept_before["eval_before"]
    assert not checkpoints.exists(), "checkpoints removed once the run is saved"

    straight = setup.root / "sft-straight"
    first = train(recipe(), straight, progress=lambda m: None, cuda=False)
    assert first["eval_before"]["eval_loss"] == pytest.approx(kept_before["eval_before"]["eval_loss"])
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(straight / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    with pytest.raises(Stop):
        train(recipe(), setup.root / "sft-changed", progress=stop_at_step_3, cuda=False)
    lines.clear()
    metrics = train(recipe(seed=7), setup.root / "sft-changed", progress=lines.append, cuda=False)
    assert metrics["resumed_from_step"] == 0 and any("discarded" in line for line in lines)


def test_raw_text_never_reaches_trl(setup):
    from datasets import Dataset
    from trl import SFTConfig

    from training.stages.sft import sft_trainer_class

    sft_cls = sft_trainer_class()
    tok_model = make_tiny_qwen2(make_tokenizer("</s>", split_eos_text=True))
    data = Dataset.from_list([{"prompt": "名前は？", "completion": "小野寺絢音ですわ。"}])
    args = SFTConfig(
        output_dir=str(setup.root / "x"), report_to=[], use_cpu=True, bf16=False, max_length=None
    )
    with pytest.raises(RagPersonaError, match="pre-tokenised"):
        sft_cls(
            model=tok_model,
            args=args,
            train_dataset=data,
            processing_class=make_tokenizer("</s>", split_eos_text=True),
        )


def test_mode_is_picked_and_reported(monkeypatch):
    r = Recipe(name="x", stage="sft")
    assert pick_mode(r, cuda=False).method == "LoRA"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    no_bnb = pick_mode(r, cuda=True)
    assert no_bnb.method == "LoRA" and "bitsandbytes" in no_bnb.reason
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    q = pick_mode(r, cuda=True)
    assert q.method == "QLoRA" and q.quantized
    with pytest.raises(RagPersonaError, match="needs CUDA"):
        pick_mode(Recipe(name="x", stage="sft", quantization="4bit"), cuda=False)


def test_bundled_recipes_load_and_match_the_users_settings():
    names = {p.stem for p in RECIPES_DIR.glob("*.yaml")}  # each loads: tests/test_recipes.py
    assert {"sft-7b-qlora", "dpo-7b-qlora", "sft-0.5b-cpu", "dpo-0.5b-cpu"} <= names
    users = load_recipe("sft-7b-qlora")
    assert (users.lora.r, users.lora.lora_alpha, users.lora.lora_dropout, users.lora.target_modules) == (
        8,
        128,
        0.05,
        "all-linear",
    )
    assert (
        users.learning_rate,
        users.lr_scheduler_type,
        users.num_train_epochs,
        users.per_device_train_batch_size,
    ) == (1e-5, "cosine", 3, 2)
    assert load_recipe("dpo-7b-qlora").beta == 0.3
    assert load_recipe("dpo-0.5b-cpu").loss_type == ["sigmoid", "sft"]


def test_train_cli_runs_a_recipe(setup, tmp_path):
    from rag_persona.cli.app import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: cli-sft\nstage: sft\nbase_model: {setup.model}\ndata_dir: {setup.data}\ntrain_file: sft.jsonl\n"
        "learning_rate: 1.0e-3\n"
    )
    runner = CliRunner()
    wrong = runner.invoke(app, ["train", "dpo", "--recipe", str(recipe)])
    assert wrong.exit_code == 2 and "stage" in wrong.output
    out = tmp_path / "adapter"
    res = runner.invoke(
        app, ["train", "sft", "--recipe", str(recipe), "--out", str(out), "--max-steps", "1", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert "LoRA on cpu" in res.output
    assert (out / "adapter_model.safetensors").is_file()


def test_shipped_adapter_becomes_the_default(setup, sft_run, tmp_path, monkeypatch):
    from rag_persona.evaluation.evaluate import default_adapter, resolve_adapter

    monkeypatch.delenv("RAG_PERSONA_CHAT_ADAPTER", raising=False)
    dest = ship_adapter(setup.root / "sft", tmp_path / "adapters" / "tiny-persona")
    info = json.loads((dest / "rag_persona_adapter.json").read_text())
    assert info["default"] and info["base_model"] == setup.model and info["stages"] == ["sft:tiny-sft"]
    assert all(v.dtype == torch.bfloat16 for v in load_file(dest / "adapter_model.safetensors").values())
    assert default_adapter(setup.model, "ojousama", root=tmp_path / "adapters") == str(dest)
    assert default_adapter("other-model", "ojousama", root=tmp_path / "adapters") is None
    # Shipping another default for the same model and persona demotes the earlier one: one default each.
    root = tmp_path / "adapters2"
    first = ship_adapter(setup.root / "sft", root / "a-first")
    newer = ship_adapter(setup.root / "sft", root / "b-newer")
    assert default_adapter(setup.model, "ojousama", root=root) == str(newer)
    assert not json.loads((first / "rag_persona_adapter.json").read_text())["default"]
    ship_adapter(setup.root / "sft", root / "c-opt-in", default=False)
    assert default_adapter(setup.model, "ojousama", root=root) == str(newer)
    monkeypatch.setenv("RAG_PERSONA_CHAT_ADAPTER", "none")
    assert default_adapter(setup.model, "ojousama", root=tmp_path / "adapters") is None
    assert resolve_adapter(None, "none") is None and resolve_adapter(None, "x") == "x"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup.model), str(dest))
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_top_layers_puts_lora_on_the_last_layers_only(setup):
    run = train(
        _recipe(setup, "sft", lora=LoraRecipe(top_layers=1)),
        setup.root / "sft-top",
        progress=lambda m: None,
        keep_model=True,
        cuda=False,
    )
    _, lora = _split(run["model"])
    layers = {name.split(".layers.")[1].split(".")[0] for name in lora}
    assert layers == {"1"}  # the tiny model has layers 0 and 1
    kinds = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in lora}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_folder_it_did_not_write_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch, stage):
    import rag_persona.generation as generation

    def never(*args, **kwargs):
        raise AssertionError("the base model was loaded before the output folder was checked")

    monkeypatch.setattr(generation, "load_causal_lm", never)
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    with pytest.raises(RagPersonaError, match=r"notes: folder is not empty and holds no recipe\.yaml"):
        train(_recipe(setup, stage), out, progress=lambda m: None, cuda=False)
    assert (out / "todo.txt").read_text() == "mine"


def test_ship_adapter_refuses_bad_runs_and_names_before_writing(setup, sft_run, tmp_path):
    import shutil

    from rag_persona.cli.app import app

    root = tmp_path / "adapters"
    good = ship_adapter(setup.root / "sft", root / "good")  # a sibling that the failures must not touch
    no_weights = tmp_path / "no-weights"
    shutil.copytree(setup.root / "sft", no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    garbage = tmp_path / "garbage"
    shutil.copytree(setup.root / "sft", garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"\x01\x00")
    loop = tmp_path / "loop"
    shutil.copytree(setup.root / "sft", loop)
    metrics = json.loads((loop / "metrics.json").read_text())
    (loop / "metrics.json").write_text(json.dumps({**metrics, "init_adapter": str(loop)}))
    for run, pattern in [
        (no_weights, r"adapter_model\.safetensors: no such file"),
        (garbage, r"adapter_model\.safetensors: not a readable safetensors file"),
        (loop, r"'init_adapter' loops back"),
    ]:
        with pytest.raises(RagPersonaError, match=pattern):
            ship_adapter(run, root / "bad")
        assert not (root / "bad").exists()
    (root / "broken").mkdir()
    (root / "broken" / "rag_persona_adapter.json").write_text("{")
    with pytest.raises(RagPersonaError, match=r"broken/rag_persona_adapter\.json"):
        ship_adapter(setup.root / "sft", root / "bad")
    assert (
        not (root / "bad").exists() and json.loads((good / "rag_persona_adapter.json").read_text())["default"]
    )
    res = CliRunner().invoke(app, ["ship-adapter", str(setup.root / "sft"), "--name", "../../escaped"])
    assert res.exit_code == 2 and "--name '../../escaped': must be a plain folder name" in res.stderr
