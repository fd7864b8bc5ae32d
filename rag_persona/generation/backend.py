"""The one contract every engine meets: prompt token ids + decoding settings + cancel in; text pieces, stop reason, timings out."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

STOP_EOS, STOP_LENGTH, STOP_CANCELLED = "eos", "length", "cancelled"


@dataclass
class Timings:
    """llama.cpp-server style timings of one reply (retrieval_ms is filled in by the chat turn)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_ms: float = 0.0
    ttft_ms: float | None = None
    completion_tokens: int = 0
    decode_tok_s: float | None = None
    total_ms: float = 0.0
    retrieval_ms: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def timing_line(timings: dict) -> str:
    """The timings a user reads under a reply: retrieval, prompt (cached part), first token, decode speed."""
    parts = []
    if timings.get("retrieval_ms") is not None:
        parts.append(f"retrieval {timings['retrieval_ms']:.0f} ms")
    parts.append(f"prompt {timings['prompt_tokens']} tok ({timings['cached_tokens']} cached)")
    if timings.get("ttft_ms") is not None:
        parts.append(f"first token {timings['ttft_ms']:.0f} ms")
    if timings.get("decode_tok_s"):
        parts.append(f"{timings['decode_tok_s']:.1f} tok/s")
    return ", ".join(parts)


class ChatBackend(Protocol):
    """An engine that continues a token-id prompt. The ids come from our one prompt builder, never the engine."""

    engine: str  # "llama.cpp", "transformers" or "remote"
    source: str  # the model it runs (path, alias, id or URL)
    tokenizer: object  # the Hugging Face tokenizer the prompt builder renders and encodes with

    def eos_ids(self) -> list[int]: ...

    def generate(
        self, prompt_ids: list[int], settings, cancel: threading.Event | None = None
    ) -> Generation: ...


@dataclass
class Generation:
    """Iterate for text pieces; afterwards `stop_reason`, `completion_ids` and `timings` describe the reply.

    `steps` yields (token id or None, text piece, stop reason or None) from the engine: local engines give
    token ids (an EOS id ends the reply here, one rule for all), a remote server gives text and its own
    finish reason.
    """

    steps: Iterator[tuple[int | None, str, str | None]]
    prompt_tokens: int
    eos_ids: frozenset[int]
    cancel: threading.Event | None = None
    cached_tokens: int = 0
    decoder: IncrementalDecoder | None = None  # local engines: token ids → text, one rule for all
    counted_tokens: int | None = None  # a remote server's own count, where it reports one
    stop_reason: str | None = None
    completion_ids: list[int] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)

    @classmethod
    def of_tokens(
        cls, steps, tokenizer, prompt_ids, eos_ids, cancel=None, cached_tokens: int = 0
    ) -> Generation:
        """A local engine's generation: token-id steps decoded by the HF tokenizer the prompt was built with."""
        return cls(
            steps=steps,
            decoder=IncrementalDecoder(tokenizer),
            prompt_tokens=len(prompt_ids),
            eos_ids=frozenset(eos_ids),
            cancel=cancel,
            cached_tokens=cached_tokens,
        )

    def __iter__(self) -> Iterator[str]:
        started = time.perf_counter()
        first = None
        self.stop_reason = STOP_LENGTH
        try:
            for token, piece, stop in self.steps:
                if first is None:
                    first = time.perf_counter()
                if stop is not None:
                    self.stop_reason = stop
                    break
                if token is not None:
                    self.completion_ids.append(token)
                    if token in self.eos_ids:
                        self.stop_reason = STOP_EOS
                        break
                    if self.decoder is not None:
                        piece = self.decoder.push(token)
                if piece:
                    yield piece
                if self.cancel is not None and self.cancel.is_set():
                    self.stop_reason = STOP_CANCELLED
                    break
            if self.decoder is not None and (rest := self.decoder.flush()):
                yield rest
        finally:
            close = getattr(self.steps, "close", None)
            if close is not None:
                close()  # stops the engine's loop (and its thread or HTTP stream) at once
            self._finish(started, first)

    def _finish(self, started: float, first: float | None) -> None:
        end = time.perf_counter()
        n = self.counted_tokens if self.counted_tokens is not None else len(self.completion_ids)
        ttft = (first - started) * 1000 if first is not None else None
        decode_s = end - first if first is not None else 0.0
        self.timings = Timings(
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            prefill_ms=ttft or 0.0,
            ttft_ms=ttft,
            completion_tokens=n,
            decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            total_ms=(end - started) * 1000,
        )


class IncrementalDecoder:
    """Token ids → new text pieces, decoded by the HF tokenizer (special tokens skipped, UTF-8 kept whole)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # A byte-level BPE token can end inside a multi-byte character; wait for the rest of it.
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece

    def flush(self) -> str:
        """Whatever is still held back when the reply ends (an incomplete character is shown as it is)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.text = text[len(self.text) :], text
        return piece
