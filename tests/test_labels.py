"""Token-level EOS: trl's string path gets the last label wrong where the EOS text splits; ours never does."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import make_tokenizer
from typer.testing import CliRunner

from training.data.labels import (
    IGNORE,
    LabelError,
    audit_file,
    audit_labels,
    build_dpo_example,
    build_sft_example,
    eos_contrast_pairs,
    parrot_pairs,
    resolve_eos_id,
    tokenize_rows,
    trl_sft_labels,
)

SYSTEM = {"role": "system", "content": "あなたは小野寺絢音です。お嬢様言葉で話します。"}
CHAT_ROWS = [
    ([SYSTEM, {"role": "user", "content": "名前は？"}], "小野寺絢音ですわ。"),
    ([SYSTEM, {"role": "user", "content": "趣味は？"}], "ピアノと乗馬ですわ。"),
]


@pytest.fixture(scope="module")
def split_tok():
    """eos "</s>" has its own id, but the string "</s>" tokenises into ordinary pieces (Llama-2 style)."""
    return make_tokenizer("</s>", split_eos_text=True)


def trained(labels):
    return [i for i in labels if i != IGNORE]


def test_split_tokenizer_really_splits_the_eos_text(split_tok):
    ids = split_tok("ですわ。</s>", add_special_tokens=False)["input_ids"]
    assert split_tok.eos_token_id not in ids
    assert split_tok.decode(ids[-4:]).endswith("</s>") or "</s>" in split_tok.decode(ids)


def test_trl_string_path_trains_eos_as_pieces_ours_trains_the_id(split_tok):
    rows = [{"prompt": "名前は？", "completion": "小野寺絢音ですわ。"}]
    eos = resolve_eos_id(split_tok, [split_tok.eos_token_id])
    assert eos == split_tok.eos_token_id

    trl_labels = trl_sft_labels(split_tok, rows)[0].labels
    assert trained(trl_labels)[-1] != eos
    assert split_tok.decode(trained(trl_labels)[-4:]).endswith("</s>")
    report = audit_labels(split_tok, trl_labels, {eos})
    assert not report.ok
    assert any("not the EOS id" in p for p in report.problems)
    assert any("special-token text '</s>'" in p for p in report.problems)

    ours = build_sft_example(split_tok, rows[0]["prompt"], rows[0]["completion"], eos)
    assert trained(ours.labels)[-1] == eos
    assert audit_labels(split_tok, ours.labels, {eos}).ok


def test_trl_dpo_string_path_is_wrong_too_ours_is_right(split_tok):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    eos = split_tok.eos_token_id
    data = Dataset.from_list(
        [{"prompt": "名前は？", "chosen": "小野寺絢音ですわ。", "rejected": "小野寺です。"}]
    )
    args = DPOConfig(output_dir="unused", report_to=[], bf16=False, use_cpu=True, max_length=None)
    prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=split_tok), data, split_tok, args, "t")
    assert prepared[0]["chosen_ids"][-1] != eos
    assert prepared[0]["rejected_ids"][-1] != eos

    ours = build_dpo_example(split_tok, "名前は？", "小野寺絢音ですわ。", "小野寺です。", eos)
    assert ours.chosen_ids[-1] == eos and ours.rejected_ids[-1] == eos
    for ids in (ours.chosen_ids, ours.rejected_ids):
        assert audit_labels(split_tok, ids, {eos}).ok


def test_chat_labels_mask_the_prompt_and_end_in_eos(split_tok):
    eos = split_tok.eos_token_id
    prompt, answer = CHAT_ROWS[0]
    ex = build_sft_example(split_tok, prompt, [{"role": "assistant", "content": answer}], eos)
    prompt_ids = split_tok.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    n = len(prompt_ids)
    assert ex.input_ids[:n] == prompt_ids
    assert ex.labels[:n] == [IGNORE] * n
    assert ex.labels[n:] == ex.input_ids[n:]
    assert split_tok.decode(ex.labels[n:-1]) == answer
    assert ex.labels[-1] == eos


def test_special_text_in_a_completion_is_refused_or_shown(split_tok):
    eos = split_tok.eos_token_id
    with pytest.raises(LabelError, match="special-token text '</s>'"):
        build_sft_example(split_tok, "名前は？", "小野寺絢音ですわ。</s>", eos)
    loose = build_sft_example(split_tok, "名前は？", "小野寺絢音ですわ。</s>", eos, strict=False)
    report = audit_labels(split_tok, loose.labels, {eos})
    assert trained(loose.labels)[-1] == eos  # the id is right, but the text before it is not
    assert not report.ok and "special-token text" in report.problems[0]


def test_turn_end_token_is_used_when_generation_stops_on_it():
    tok = make_tokenizer("<|endoftext|>")  # eos differs from the template's turn end <|im_end|>
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert resolve_eos_id(tok, [tok.eos_token_id, im_end]) == im_end
    assert resolve_eos_id(tok, [tok.eos_token_id]) == tok.eos_token_id


def test_overlong_examples_are_dropped_not_truncated(split_tok):
    rows = [(f"r{i}", {"prompt": p, "completion": a}) for i, (p, a) in enumerate(CHAT_ROWS)]
    rows.append(("long", {"prompt": CHAT_ROWS[0][0], "completion": "ですわ。" * 200}))
    data = tokenize_rows(split_tok, rows, split_tok.eos_token_id, kind="sft", max_length=200)
    assert data.dropped_too_long == ["long"]
    assert all(ex.labels[-1] == split_tok.eos_token_id for ex in data.examples)


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def test_audit_file_kinds(tmp_path, split_tok):
    eos = [split_tok.eos_token_id]
    users = _write(tmp_path / "users.jsonl", [{"text": "名前は？ 小野寺絢音ですわ。</s>"}])
    report = audit_file(split_tok, users, generation_eos_ids=eos)
    assert not report["ok"] and report["kind"] == "text"

    sft = _write(
        tmp_path / "sft.jsonl",
        [{"prompt": p, "completion": [{"role": "assistant", "content": a}]} for p, a in CHAT_ROWS],
    )
    assert audit_file(split_tok, sft, generation_eos_ids=eos)["ok"]
    assert not audit_file(split_tok, sft, generation_eos_ids=eos, builder="trl")["ok"]

    dpo = _write(
        tmp_path / "dpo.jsonl",
        [
            {
                "prompt": p,
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": "はい。"}],
            }
            for p, a in CHAT_ROWS
        ],
    )
    report = audit_file(split_tok, dpo, generation_eos_ids=eos)
    assert report["ok"] and report["checked"] == 4

    ex = build_sft_example(split_tok, "名前は？", "小野寺絢音ですわ。", eos[0])
    tokd = _write(
        tmp_path / "tok.jsonl", [ex.to_dict(), {"input_ids": ex.input_ids[:-1], "labels": ex.labels[:-1]}]
    )
    report = audit_file(split_tok, tokd, generation_eos_ids=eos)
    assert report["failed"] == 1 and report["rows"][0]["ok"] and not report["rows"][1]["ok"]


def test_audit_labels_cli_exit_codes(tmp_path, split_tok):
    from rag_persona.cli.app import app

    model_dir = tmp_path / "tok"
    split_tok.save_pretrained(model_dir)
    good = _write(tmp_path / "good.jsonl", [{"prompt": p, "completion": a} for p, a in CHAT_ROWS])
    bad = _write(tmp_path / "bad.jsonl", [{"text": "名前は？ 小野寺絢音ですわ。</s>"}])
    runner = CliRunner()
    ok = runner.invoke(app, ["audit-labels", "--model", str(model_dir), "--data", str(good), "--n", "2"])
    assert ok.exit_code == 0, ok.output
    assert "2/2 ok" in ok.output and "</s>" in ok.output  # the tail shows the EOS token itself
    fail = runner.invoke(app, ["audit-labels", "--model", str(model_dir), "--data", str(bad), "--json"])
    assert fail.exit_code == 1
    report = json.loads(fail.output)
    assert report["failed"] == 1 and report["rows"][0]["tail_text"].endswith("</s>")
    trl = runner.invoke(
        app, ["audit-labels", "--model", str(model_dir), "--data", str(good), "--builder", "trl"]
    )
    assert trl.exit_code == 1


# -- the bundled Qwen tokenizer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_tok(bundled_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir)


@pytest.mark.slow
def test_qwen_users_literal_eos_splits_and_fails_the_audit(qwen_tok):
    eos = resolve_eos_id(qwen_tok, [qwen_tok.eos_token_id])
    assert qwen_tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    ids = qwen_tok("ごきげんようですわ。</s>", add_special_tokens=False)["input_ids"]
    assert eos not in ids and qwen_tok.decode(ids).endswith("</s>")
    report = audit_labels(qwen_tok, ids, {eos})
    assert not report.ok and any("'</s>'" in p for p in report.problems)


@pytest.mark.slow
def test_qwen_trl_chat_path_ends_on_newline_ours_on_im_end(qwen_tok):
    from rag_persona.generation import encode_messages

    eos = resolve_eos_id(qwen_tok, [qwen_tok.eos_token_id])
    prompt, answer = CHAT_ROWS[0]
    completion = [{"role": "assistant", "content": answer}]

    trl_labels = trl_sft_labels(qwen_tok, [{"prompt": prompt, "completion": completion}])[0].labels
    assert trained(trl_labels)[-1] != eos
    assert qwen_tok.decode(trained(trl_labels)[-1:]) == "\n"
    assert not audit_labels(qwen_tok, trl_labels, {eos}).ok

    ours = build_sft_example(qwen_tok, prompt, completion, eos)
    assert trained(ours.labels)[-1] == eos
    assert audit_labels(qwen_tok, ours.labels, {eos}).ok
    # The training prompt is token for token what inference feeds the model.
    n = ours.labels.index(next(i for i in ours.labels if i != IGNORE))
    assert ours.input_ids[:n] == encode_messages(qwen_tok, prompt)[0].tolist()
    assert qwen_tok.decode(trained(ours.labels)[:-1]) == answer


def _dpo_rows(chat_rows) -> list[tuple[str, dict]]:
    return [
        (
            f"r{i}",
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": "はい。"}],
            },
        )
        for i, (prompt, answer) in enumerate(chat_rows)
    ]


def test_eos_contrast_pairs_differ_only_where_the_answer_ends(split_tok):
    eos = split_tok.eos_token_id
    rows = _dpo_rows(CHAT_ROWS * 2)
    data = tokenize_rows(split_tok, rows, eos, kind="dpo")
    pairs = eos_contrast_pairs(data, eos, 0.5, seed=0, repeat_tokens=3)
    assert len(pairs.examples) == 2 and all(s.endswith("(EOS contrast)") for s in pairs.sources)
    for ex, src in zip(pairs.examples, pairs.sources, strict=True):
        original = data.examples[data.sources.index(src.split(" ")[0])]
        assert ex.prompt_ids == original.prompt_ids and ex.chosen_ids == original.chosen_ids
        answer = ex.chosen_ids[:-1]
        assert ex.chosen_ids[-1] == eos and eos not in ex.rejected_ids
        assert ex.rejected_ids == answer + answer[:3]  # same tokens up to the EOS position, then runs on
    with pytest.raises(LabelError, match="share"):
        eos_contrast_pairs(data, eos, 0.0, seed=0)
    broken = tokenize_rows(split_tok, rows[:1], eos, kind="dpo")
    broken.examples[0].chosen_ids = broken.examples[0].chosen_ids[:-1]
    with pytest.raises(LabelError, match="does not end in EOS"):
        eos_contrast_pairs(broken, eos, 1.0, seed=0)


def test_parrot_pairs_reject_the_users_message_said_back(split_tok):
    eos = split_tok.eos_token_id
    rows = _dpo_rows(CHAT_ROWS)
    pairs = parrot_pairs(split_tok, rows, eos, 1.0, seed=0)
    assert len(pairs.examples) == 2
    for ex, (_, row) in zip(pairs.examples, rows, strict=True):
        user = row["prompt"][-1]["content"]
        assert split_tok.decode(ex.rejected_ids[:-1]) == user and ex.rejected_ids[-1] == eos
        assert split_tok.decode(ex.chosen_ids[:-1]) == row["chosen"][0]["content"]
    assert len(parrot_pairs(split_tok, rows, eos, 1.0, seed=0, max_length=5).examples) == 0
    no_user = [("bad", {**rows[0][1], "prompt": [SYSTEM]})]
    with pytest.raises(LabelError, match="no user message"):
        parrot_pairs(split_tok, no_user, eos, 1.0, seed=0)
