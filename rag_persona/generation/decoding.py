"""Chat messages to a streamed reply that stops at the model's EOS token, with how it ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from rag_persona.errors import RagPersonaError


class ReplyNoRepeatNGram:
    """Logits processor: ban any token that would repeat an n-gram of the generated reply (prompt excluded).

    The prompt length is taken from the first call, so make one instance per `generate` call.
    """

    def __init__(self, n: int):
        if n < 2:
            raise RagPersonaError(f"reply_no_repeat_ngram: {n} must be at least 2")
        self.n, self.start = n, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        n = self.n
        for row, ids in enumerate(input_ids[:, self.start :].tolist()):
            if len(ids) < n:
                continue
            tail = ids[len(ids) - n + 1 :]
            banned = {ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i : i + n - 1] == tail}
            if banned:
                scores[row, list(banned)] = float("-inf")
        return scores


@dataclass
class GenerationSettings:
    """Decoding settings; greedy by default so replies are reproducible."""

    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    # > 0: the reply never repeats one of its own n-grams (stops small models' loops). Unlike transformers'
    # no_repeat_ngram_size, the prompt is not counted, so facts can still be copied from the context.
    reply_no_repeat_ngram: int = 4
    seed: int | None = None

    def to_generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.reply_no_repeat_ngram:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([ReplyNoRepeatNGram(self.reply_no_repeat_ngram)])
        if self.do_sample:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class Reply:
    """A finished reply: text, whether the model ended it (EOS) rather than the token limit, and timings."""

    text: str
    ended_by_eos: bool
    new_tokens: int
    prompt_tokens: int
    seconds: float
    first_token_seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, list | tuple) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_messages(tokenizer, messages: list[dict]):
    """Apply the model's chat template and return input ids (1, n)."""
    if not messages:
        raise RagPersonaError("generation: no messages to answer")
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


class ReplyStream:
    """Iterate to receive text pieces as they are decoded; `.reply` is set once iteration ends."""

    def __init__(self, loaded, messages: list[dict], settings: GenerationSettings | None = None):
        self.loaded = loaded
        self.messages = messages
        self.settings = settings or GenerationSettings()
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        input_ids = encode_messages(tokenizer, self.messages).to(model.device)
        eos = eos_token_ids(model, tokenizer)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        out: dict = {}

        def run() -> None:
            try:
                if self.settings.seed is not None:
                    torch.manual_seed(self.settings.seed)
                with torch.inference_mode():
                    out["ids"] = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        eos_token_id=eos,
                        pad_token_id=tokenizer.pad_token_id,
                        streamer=streamer,
                        **self.settings.to_generate_kwargs(),
                    )
            except BaseException as exc:  # surfaced in the consumer thread below
                out["error"] = exc
                streamer.end()

        started = time.perf_counter()
        first = None
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            if first is None and piece:
                first = time.perf_counter() - started
            pieces.append(piece)
            yield piece
        thread.join()
        if "error" in out:
            raise out["error"]
        new_ids = out["ids"][0, input_ids.shape[1] :].tolist()
        self.reply = Reply(
            text="".join(pieces).strip(),
            ended_by_eos=bool(new_ids) and new_ids[-1] in eos,
            new_tokens=len(new_ids),
            prompt_tokens=int(input_ids.shape[1]),
            seconds=time.perf_counter() - started,
            first_token_seconds=first,
        )


def generate_reply(loaded, messages: list[dict], settings: GenerationSettings | None = None) -> Reply:
    stream = ReplyStream(loaded, messages, settings)
    for _ in stream:
        pass
    assert stream.reply is not None
    return stream.reply
