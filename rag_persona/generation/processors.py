"""The reply-only no-repeat n-gram rule as a vectorised `transformers.LogitsProcessor`."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from rag_persona.errors import RagPersonaError


class ReplyNoRepeatNGram(LogitsProcessor):
    """Ban any token that would repeat an n-gram of the generated reply (prompt excluded).

    Unlike transformers' no_repeat_ngram_size the prompt is not counted, so facts can still be copied from
    the context. The prompt length is taken from the first call, so make one instance per `generate` call.
    """

    def __init__(self, n: int):
        if n < 2:
            raise RagPersonaError(f"reply_no_repeat_ngram: {n} must be at least 2")
        self.n, self.start = n, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        reply = input_ids[:, self.start :].to(scores.device)
        if reply.shape[1] < self.n:
            return scores
        # All n-grams of the reply so far, (batch, windows, n): a window whose first n-1 tokens equal the
        # reply's last n-1 tokens bans its last token for the next step.
        grams = reply.unfold(1, self.n, 1)
        tail = reply[:, reply.shape[1] - self.n + 1 :]
        hit = (grams[:, :, :-1] == tail[:, None, :]).all(dim=-1)
        # scatter_add, not scatter: a token banned by one window must stay banned if another misses.
        banned = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        banned.scatter_add_(1, grams[:, :, -1], hit.to(torch.int32))
        return scores.masked_fill_(banned > 0, float("-inf"))
