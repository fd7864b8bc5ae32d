"""Japanese morphological analysis: one cached Sudachi tokenizer per split mode, safe across threads."""

from __future__ import annotations

import functools
import re
import threading

# Sudachi refuses inputs over 49,149 bytes; longer text is analysed in chunks cut at this many characters
# (a UTF-8 character is at most 4 bytes: 12,000 of them always fit, emoji included).
SUDACHI_CHUNK_CHARS = 12_000
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


_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_problem(text: str) -> str | None:
    """Why text cannot be encoded as UTF-8 (a lone surrogate, e.g. JSON's "\\ud800"), or None when it can.

    Python decodes such JSON escapes into str without complaint; the embedder and Sudachi then fail
    with UnicodeEncodeError deep inside a request, so inputs are checked where they enter.
    """
    m = _SURROGATE.search(text)
    return (
        None
        if m is None
        else f"not valid Unicode (lone surrogate U+{ord(m.group()):04X} at character {m.start()})"
    )
