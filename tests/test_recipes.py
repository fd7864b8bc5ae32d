"""Recipes: every bundled one loads and validates; a misspelt or mistyped key is one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rag_persona.errors import RagPersonaError
from training.recipes import (
    RECIPES_DIR,
    STAGES,
    Recipe,
    bundled_recipes,
    load_recipe,
    read_recipe_file,
    recipe_from_dict,
)

BUNDLED = bundled_recipes()


def test_the_recipes_folder_holds_only_yaml_recipes():
    assert BUNDLED and all(p.parent == RECIPES_DIR for p in BUNDLED)
    assert sorted(p.name for p in RECIPES_DIR.iterdir()) == sorted(p.name for p in BUNDLED)
    assert {load_recipe(p).stage for p in BUNDLED} == set(STAGES)


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_every_bundled_recipe_loads_and_validates(path: Path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe = load_recipe(path.stem)
    assert recipe.name == path.stem == raw["name"]
    assert load_recipe(path) == recipe  # by name or by path: the same recipe
    # What a run saves as recipe.yaml loads back to the same recipe.
    assert recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict())), "saved") == recipe
    assert recipe.output_path() == Path("runs") / recipe.name


def _bad(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("name: x\nstage: sft\nlearning_rat: 1.0e-5\n", "learning_rat", "unknown"),
        ("name: x\nstage: sft\nbatch_size: 2\n", "batch_size", "unknown"),  # not transformers' name
        ("name: x\nstage: sft\nlora: {r: 8, alfa: 16}\n", "lora.alfa", "unknown"),
        ("name: x\nstage: rl\nrl: {num_generation: 2}\n", "rl.num_generation", "unknown"),
        ("name: x\nstage: xattn\nmax_steps: 5\nxattn: {rnak: 4}\n", "xattn.rnak", "unknown"),
        ("name: x\nstage: sft\nlearning_rate: 1e-5x\n", "learning_rate", "expected a number"),
        ("name: x\nstage: sft\nlearning_rate: .nan\n", "learning_rate", "must be positive"),
        ("name: x\nstage: sft\nnum_train_epochs: .inf\n", "num_train_epochs", "not a finite number"),
        ("name: x\nstage: sft\nlr_scheduler_type: cosinee\n", "lr_scheduler_type", "'cosinee' is not one of"),
        ("name: x\nstage: sft\nmax_steps: -5\n", "max_steps", "a number of steps, or -1"),
        ("name: x\nstage: sft\nlogging_steps: 0\n", "logging_steps", "at least 1"),
        ("name: x\nstage: sft\nmax_eval_examples: -1\n", "max_eval_examples", "at least 0"),
        ("name: x\nstage: sft\nmax_train_examples: 0\n", "max_train_examples", "at least 1"),
        ("name: x\nstage: sft\nweight_decay: -1.0\n", "weight_decay", "must not be negative"),
        ("name: x\nstage: sft\nseed: -1\n", "seed", "in [0, 4294967295]"),
        ("name: x\nstage: sft\ncpu_threads: -1\n", "cpu_threads", "at least 0"),
        ("name: x\nstage: sft\nlora: {top_layers: -3}\n", "lora.top_layers", "a number of layers"),
        ("name: x\nstage: dpo\nloss_type: [bogus]\n", "loss_type", "['bogus'] not in trl's sigmoid"),
        ("name: x\nstage: sft\nmax_steps: true\n", "max_steps", "expected a whole number"),
        ("name: x\nstage: sft\nlora: {target_modules: 3}\n", "lora.target_modules", "expected text or"),
        ("name: x\nstage: sft\nlora: 8\n", "lora", "expected a mapping"),
        ("name: x\nstage: sft\nwarmup_steps: 2.5\n", "warmup_steps", "a whole number of steps"),
        ("name: x\nstage: xattn\n", "max_steps", "must be positive"),  # the xattn stage counts steps
        ("name: x\nstage: ppo\n", "stage", "'ppo' is not one of"),
        ("stage: sft\n", "name", "missing"),
    ],
)
def test_a_wrong_key_or_value_is_one_line_naming_file_and_key(tmp_path, text, key, problem):
    path = _bad(tmp_path, text)
    with pytest.raises(RagPersonaError) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path}: field '{key}': {problem}")


def test_a_number_yaml_reads_as_text_is_a_number_and_a_non_utf8_file_one_line(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as text; users write it that way (and trl's own examples do).
    assert load_recipe(_bad(tmp_path, "name: x\nstage: sft\nlearning_rate: 1e-5\n")).learning_rate == 1e-5
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: x\nstage: sft\nnotes: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RagPersonaError, match=r"latin1\.yaml: not UTF-8 text"):
        load_recipe(path)


def test_a_close_misspelling_names_the_field_meant(tmp_path):
    with pytest.raises(RagPersonaError, match="did you mean 'learning_rate'"):
        load_recipe(_bad(tmp_path, "name: x\nstage: sft\nlearning_rat: 1.0e-5\n"))


def test_broken_yaml_names_the_line(tmp_path):
    with pytest.raises(RagPersonaError, match=r"bad.yaml:3: invalid YAML"):
        load_recipe(_bad(tmp_path, "name: x\nstage: sft\n  seed: 3\n"))


def test_a_key_given_twice_names_its_second_line(tmp_path):
    # PyYAML keeps the last value silently; a recipe edited by appending a key must not train on a guess.
    with pytest.raises(
        RagPersonaError, match=r"bad.yaml:4: invalid YAML \(key 'learning_rate' given twice\)"
    ):
        load_recipe(_bad(tmp_path, "name: x\nstage: sft\nlearning_rate: 1.0e-5\nlearning_rate: 2.0e-5\n"))
    with pytest.raises(RagPersonaError, match=r"key 'r' given twice"):
        load_recipe(_bad(tmp_path, "name: x\nstage: sft\nlora:\n  r: 8\n  r: 16\n"))
    # anchors and merge keys still work (shared blocks between recipes' sections)
    text = "base: &lora {r: 4, lora_alpha: 8}\nlora:\n  <<: *lora\n  r: 16\n"
    assert read_recipe_file(_bad(tmp_path, text))["lora"] == {"r": 16, "lora_alpha": 8}
    with pytest.raises(RagPersonaError, match=r"bad\.yaml:3: invalid YAML"):
        load_recipe(_bad(tmp_path, "name: x\nstage: sft\n? [a, b]\n: 1\n"))


def test_overrides_replace_fields_and_merge_into_blocks():
    recipe = load_recipe(
        "rl-0.5b-cpu", seed=7, max_steps=2, cpu_threads=None, rl={"reward_adapter": "runs/other-rm"}
    )
    assert (recipe.seed, recipe.max_steps, recipe.cpu_threads) == (7, 2, None)
    assert recipe.rl.reward_adapter == "runs/other-rm" and recipe.rl.num_generations == 2  # rest kept
    assert recipe.output_path("somewhere") == Path("somewhere")
    with pytest.raises(RagPersonaError, match="recipe override: field 'batch_size': unknown"):
        load_recipe("sft-0.5b-cpu", batch_size=4)
    with pytest.raises(RagPersonaError, match="field 'rl.top_k': unknown"):
        load_recipe("rl-0.5b-cpu", rl={"top_k": 3})


def test_unknown_recipe_names_the_bundled_ones():
    with pytest.raises(RagPersonaError, match="recipe not found .*sft-0.5b-cpu.*xattn_cpu"):
        load_recipe("no-such-recipe")


def test_xattn_recipes_share_the_seed_and_output_rules():
    cpu = load_recipe("xattn_cpu")
    assert cpu.stage == "xattn" and cpu.xattn.layers == [6, 9, 12, 15, 18, 21] and cpu.seed == 0
    assert cpu.output_path() == Path("runs/xattn_cpu") and cpu.data_dir == "runs/data"
    assert load_recipe("xattn_cpu_copy").init_adapter == "runs/xattn_cpu_continue"
    assert "lora" not in cpu.to_dict() and "xattn" in cpu.to_dict()
    assert Recipe(name="x", stage="sft").seed == 42  # the default seed of every stage
