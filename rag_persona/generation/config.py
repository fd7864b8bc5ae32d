"""Decoding settings: one dataclass that yields the `transformers.GenerationConfig` every reply decodes with."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationSettings:
    """Decoding settings; greedy by default so replies are reproducible.

    torch and transformers are imported inside the methods: importing the settings (the UI, the command
    line) must not load them.
    """

    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    # > 0: the reply never repeats one of its own n-grams (stops small models' loops). Unlike transformers'
    # no_repeat_ngram_size, the prompt is not counted, so facts can still be copied from the context.
    reply_no_repeat_ngram: int = 4
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def generation_config(self, **extra):
        """The GenerationConfig these settings decode with; `extra`: more fields (eos_token_id, pad_token_id).

        Fields left unset (None) are filled from the model's own generation config by `generate`. Sampling
        parameters are set only when sampling: greedy decoding never reads them.
        """
        from transformers import GenerationConfig

        sampling = {"temperature": self.temperature, "top_p": self.top_p} if self.do_sample else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            repetition_penalty=self.repetition_penalty,
            do_sample=self.do_sample,
            **sampling,
            **extra,
        )

    def logits_processors(self):
        """Fresh processors for one `generate` call (the n-gram rule remembers that call's prompt length)."""
        from transformers import LogitsProcessorList

        from rag_persona.generation.processors import ReplyNoRepeatNGram

        if not self.reply_no_repeat_ngram:
            return LogitsProcessorList()
        return LogitsProcessorList([ReplyNoRepeatNGram(self.reply_no_repeat_ngram)])

    def to_generate_kwargs(self) -> dict:
        """`generate` arguments; wrappers and subclasses extend this dict (stopping criteria, a KV cache)."""
        return {"generation_config": self.generation_config(), "logits_processor": self.logits_processors()}
