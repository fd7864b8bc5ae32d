"""Bundled 0.5B: load time and decode speed from the converted bf16 folder vs the GGUF file, one run."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rag_persona.generation import (
    BUNDLED,
    GenerationSettings,
    LoadedModel,
    generate_reply,
    join_and_verify,
    prepare,
)

PROMPTS = [
    "自己紹介を一文でしてください。",
    "好きな季節とその理由を教えてください。",
    "紅茶の淹れ方を簡単に説明して。",
]


def measure(name: str, load) -> dict:
    started = time.perf_counter()
    model, tokenizer = load()
    load_s = time.perf_counter() - started
    loaded = LoadedModel(
        model=model.eval(), tokenizer=tokenizer, source=name, device="cpu", dtype=str(model.dtype)
    )
    settings = GenerationSettings(max_new_tokens=48)
    generate_reply(
        loaded, [{"role": "user", "content": "hi"}], GenerationSettings(max_new_tokens=4)
    )  # warm-up
    tokens, seconds, first = 0, 0.0, []
    for prompt in PROMPTS:
        reply = generate_reply(loaded, [{"role": "user", "content": prompt}], settings)
        tokens += reply.new_tokens
        seconds += reply.seconds
        first.append(reply.first_token_seconds or 0.0)
    return {
        "source": name,
        "dtype": str(model.dtype).replace("torch.", ""),
        "load_s": round(load_s, 1),
        "ttft_s": round(sum(first) / len(first), 2),
        "decode_tok_s": round(tokens / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = prepare("qwen2.5-coder-0.5b", progress=print)
    rows = [
        measure(
            "converted folder (bf16 safetensors)",
            lambda: (
                AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, use_safetensors=True),
                AutoTokenizer.from_pretrained(folder),
            ),
        )
    ]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = join_and_verify(BUNDLED["qwen2.5-coder-0.5b"], Path(tmp) / "model.gguf")
        rows.append(
            measure(
                "GGUF direct (dequantised on load)",
                lambda: (
                    AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name),
                    AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name),
                ),
            )
        )
    print(f"\n{'source':<38} {'dtype':<9} {'load s':>7} {'TTFT s':>7} {'decode tok/s':>13}")
    for r in rows:
        print(f"{r['source']:<38} {r['dtype']:<9} {r['load_s']:>7} {r['ttft_s']:>7} {r['decode_tok_s']:>13}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
