"""Japanese morphological analysis: one cached Sudachi tokenizer per split mode, safe across threads."""

from __future__ import annotations

import functools
import threading

# Sudachi refuses inputs over 49,149 bytes; longer text is analysed in chunks cut at this many characters
# (a UTF-8 Japanese character is 3 bytes).
SUDACHI_CHUNK_CHARS = 16_000
_LOCK = threading.Lock()  # a Sudachi tokenizer is not thread-safe


@functools.cache
def _tokenizer(mode: str):
    from sudachipy import SplitMode, dictionary

    return dictionary.Dictionary(dict="core").tokenizer(mode=getattr(SplitMode, mode))


def morphemes(text: str, mode: str = "C") -> list:
    """Sudachi morphemes of text (split mode "A", "B" or "C"); texts of any length."""
    out = []
    with _LOCK:
        tok = _tokenizer(mode)
        for start in range(0, max(len(text), 1), SUDACHI_CHUNK_CHARS):
            out.extend(tok.tokenize(text[start : start + SUDACHI_CHUNK_CHARS]))
    return out
