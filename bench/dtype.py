"""transformers on CPU in float32 vs bfloat16, side by side: prefill, decode and one LoRA training step.

The compute dtype on a CPU is bfloat16 only where the CPU multiplies it natively (AMX / AVX512-BF16 / Arm
BF16; `rag_persona.utils.hardware`), else float32. This bench shows why, on the machine it runs on: each
row loads the bundled model through `load_causal_lm` with RAG_PERSONA_DTYPE set, then times a prefill of
`--prompt-tokens`, greedy decode of `--new-tokens` and one forward+backward of a LoRA (r 8, every linear
layer of the top half) on a batch of 2 x `--train-tokens`. Same ids, same threads for every row.

    python bench/dtype.py [--model qwen2.5-coder-0.5b] [--threads 2] [--out bench/results/dtype.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    """The CPU model and its bf16-relevant flags."""
    text = Path("/proc/cpuinfo").read_text(errors="ignore") if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = set(text.split())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16") if f in flags]
    return f"{model or platform.processor()} ({', '.join(shown) or 'no AVX2/AVX-512 flags'})"


def measure(model_name: str, dtype: str, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from rag_persona.generation import load_causal_lm

    os.environ["RAG_PERSONA_DTYPE"] = dtype
    t0 = time.perf_counter()
    loaded = load_causal_lm(model_name, progress=lambda m: None)
    load_s = time.perf_counter() - t0
    model = loaded.model
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(100, min(vocab, 30000), (1, args.prompt_tokens), generator=gen)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.new_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    layers = model.config.num_hidden_layers
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(layers // 2, layers)),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    batch = torch.randint(100, min(vocab, 30000), (2, args.train_tokens), generator=gen)
    t0 = time.perf_counter()
    loss = peft_model(batch, labels=batch).loss
    loss.backward()
    step_s = time.perf_counter() - t0
    return {
        "dtype": loaded.dtype,
        "load_s": round(load_s, 1),
        "prefill_s": round(prefill_s, 2),
        "prefill_tok_s": round(args.prompt_tokens / prefill_s, 1),
        "decode_tok_s": round(args.new_tokens / decode_s, 2),
        "train_step_s": round(step_s, 1),
        "loss_finite": bool(torch.isfinite(loss).item()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--train-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dtype.md"))
    args = ap.parse_args()

    import torch

    from rag_persona.utils.hardware import cpu_dtype, dtype_name

    torch.set_num_threads(args.threads)
    os.environ.pop("RAG_PERSONA_DTYPE", None)
    auto = dtype_name(cpu_dtype())
    rows = [measure(args.model, d, args) for d in args.dtypes.split(",")]
    head = (
        f"# transformers on CPU: float32 vs bfloat16 (bench/dtype.py)\n\n"
        f"`python bench/dtype.py {' '.join(sys.argv[1:])}` on {cpu_line()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}. Prefill: {args.prompt_tokens} tokens; "
        f"decode: {args.new_tokens} greedy tokens with the KV cache; train step: forward+backward of a LoRA "
        f"(r 8, all linear layers of the top half) on 2 x {args.train_tokens} tokens. "
        f"The loader's automatic choice on this CPU: **{auto}**.\n\n"
        "| dtype | load s | prefill s | prefill tok/s | decode tok/s | LoRA train step s | loss finite |\n"
        "|---|---:|---:|---:|---:|---:|---|\n"
    )
    lines = [
        f"| {r['dtype']}{' (auto)' if r['dtype'] == auto else ''} | {r['load_s']} | {r['prefill_s']} | "
        f"{r['prefill_tok_s']} | {r['decode_tok_s']} | {r['train_step_s']} | {r['loss_finite']} |"
        for r in rows
    ]
    text = head + "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"cpu": cpu_line(), "auto": auto, "args": vars(args), "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
