"""The transformers engine: a loaded causal LM (any HF model, CUDA, peft adapter, the xattn wrapper) behind ChatBackend."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from rag_persona.generation.backend import Generation
from rag_persona.utils.tokens import eos_token_ids

_DONE = object()


class _IdStreamer:
    """transformers streamer that hands each new token id to the consumer thread (the prompt is skipped)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(_DONE)


class _Stop:
    """Stopping criterion: the UI's stop button, a client that went away, or the consumer closing the stream."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


@dataclass
class TransformersBackend:
    """Wraps a `LoadedModel` (model + tokenizer + how it was loaded); generation runs in a worker thread."""

    loaded: object
    engine: str = "transformers"

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def source(self) -> str:
        return self.loaded.source

    def eos_ids(self) -> list[int]:
        return eos_token_ids(self.loaded.model, self.loaded.tokenizer)

    def generate(self, prompt_ids: list[int], settings, cancel: threading.Event | None = None) -> Generation:
        steps = self._steps(list(prompt_ids), settings, cancel)
        return Generation.of_tokens(steps, self.tokenizer, prompt_ids, self.eos_ids(), cancel)

    def _steps(self, prompt_ids, settings, cancel):
        import torch
        from transformers import StoppingCriteriaList

        from rag_persona.generation.decoding import generate_kwargs

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        input_ids = torch.tensor([prompt_ids], device=model.device)
        streamer, closed = _IdStreamer(), threading.Event()
        # settings may be a wrapper adding its own stopping criteria or a KV cache (the xattn prefix)
        kwargs = generate_kwargs(settings, model, tokenizer)
        stops = StoppingCriteriaList([*(kwargs.pop("stopping_criteria", None) or []), _Stop(cancel, closed)])
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                with torch.inference_mode():
                    model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        streamer=streamer,
                        stopping_criteria=stops,
                        **kwargs,
                    )
            except BaseException as exc:  # surfaced in the consumer thread below
                failure.append(exc)
            finally:
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            while (token := streamer.queue.get()) is not _DONE:
                yield token, "", None
        finally:
            closed.set()  # the consumer stopped early (EOS, cancel, disconnect): end generate() too
            thread.join()
        if failure:
            raise failure[0]
