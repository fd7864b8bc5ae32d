"""The `rag-persona` command line; `echo_json`, `friendly` and `_progress` for commands registered from outside."""

from rag_persona.cli.common import _progress, echo_json, friendly, keywords_for

__all__ = ["_progress", "echo_json", "friendly", "keywords_for"]
