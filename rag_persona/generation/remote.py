"""A remote OpenAI-compatible completions server (vLLM, llama.cpp server) fed the prompt our one builder made."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from rag_persona.errors import RagPersonaError
from rag_persona.generation.backend import STOP_EOS, STOP_LENGTH, Generation

PROMPT_IDS, PROMPT_TEXT = "ids", "text"


@dataclass
class RemoteBackend:
    """POSTs /v1/completions with the prompt as token ids (vLLM) or, where a server takes no ids, as the exact
    text those ids decode to (special tokens kept, so the server's tokenizer gives the same ids back).

    The reply-only no-repeat n-gram rule needs the logits and is not applied remotely; greedy decoding,
    repetition penalty, the token limit and EOS stopping are.
    """

    url: str
    tokenizer: object
    model: str | None = None
    prompt_format: str = PROMPT_IDS
    timeout: float = 120.0
    engine: str = "remote"
    info: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.url

    def eos_ids(self) -> list[int]:
        return [int(self.tokenizer.eos_token_id)] if self.tokenizer.eos_token_id is not None else []

    def body(self, prompt_ids: list[int], settings) -> dict:
        prompt = (
            list(prompt_ids)
            if self.prompt_format == PROMPT_IDS
            else self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        )
        body = {
            "prompt": prompt,
            "max_tokens": settings.max_new_tokens,
            "stream": True,
            "temperature": settings.temperature if settings.do_sample else 0.0,
            "top_p": settings.top_p if settings.do_sample else 1.0,
            # vLLM and llama.cpp server name the same multiplicative penalty differently.
            "repetition_penalty": settings.repetition_penalty,
            "repeat_penalty": settings.repetition_penalty,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        if settings.seed is not None:
            body["seed"] = int(settings.seed)
        return body

    def generate(self, prompt_ids: list[int], settings, cancel: threading.Event | None = None) -> Generation:
        gen = Generation(
            steps=iter(()),
            prompt_tokens=len(prompt_ids),
            eos_ids=frozenset(self.eos_ids()),
            cancel=cancel,
        )
        gen.steps = self._steps(list(prompt_ids), settings, gen)
        return gen

    def _steps(self, prompt_ids: list[int], settings, gen: Generation):
        import httpx

        url = f"{self.url.rstrip('/')}/v1/completions"
        try:
            with httpx.Client(timeout=self.timeout) as client:
                for attempt in (1, 2):
                    with client.stream("POST", url, json=self.body(prompt_ids, settings)) as res:
                        if res.status_code >= 400:
                            res.read()
                            if attempt == 1 and self.prompt_format == PROMPT_IDS and "prompt" in res.text:
                                # The server refuses token ids (llama.cpp's Python server answers 500 with
                                # a validation error): send the exact text they decode to instead.
                                self.prompt_format = PROMPT_TEXT
                                continue
                            raise RagPersonaError(
                                f"remote engine {self.url}: HTTP {res.status_code} ({res.text[:200].strip()})"
                            )
                        yield from self._events(res, gen)
                        return
        except httpx.HTTPError as exc:
            raise RagPersonaError(f"remote engine {self.url}: {type(exc).__name__} ({exc})") from None

    def _events(self, res, gen: Generation):
        finish, text, usage = None, [], None
        for line in res.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", [])[:1]:
                if choice.get("text"):
                    text.append(choice["text"])
                    yield None, choice["text"], None
                finish = choice.get("finish_reason") or finish
        if usage and "completion_tokens" in usage:
            gen.counted_tokens = usage["completion_tokens"]
        else:  # a server that reports no usage (chunks can hold several tokens): count with our tokenizer
            gen.counted_tokens = len(self.tokenizer("".join(text), add_special_tokens=False)["input_ids"])
        yield None, "", STOP_EOS if finish == "stop" else STOP_LENGTH
