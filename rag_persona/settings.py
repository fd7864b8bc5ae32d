"""Project-wide settings read from RAG_PERSONA_* environment variables."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from rag_persona.errors import RagPersonaError

REPO_ROOT = Path(__file__).resolve().parent.parent
KNOWLEDGE_ROOT = REPO_ROOT / "knowledge"


def _default_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rag-persona"


def is_persona_path(name: str) -> bool:
    """Whether a --persona value is a folder path rather than an id under knowledge/."""
    return "/" in name or name.startswith((".", "~")) or os.sep in name


class Settings(BaseSettings):
    """Where caches live and which models and persona are used when none is named."""

    model_config = SettingsConfigDict(env_prefix="RAG_PERSONA_")

    home: Path = _default_home()
    chat_model: str = "qwen2.5-coder-0.5b"
    embedder: str = "e5-small"
    persona: str = "ojousama"
    # Longest fact text accepted (characters). Facts go into the prompt whole: a 1,000-character fact is
    # ~700 tokens, so the default keeps k facts inside the chat models' prompt budget (and embeds in well
    # under a second); raise it for long-form knowledge with RAG_PERSONA_MAX_FACT_CHARS.
    max_fact_chars: int = 1000

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def indexes_dir(self) -> Path:
        return self.home / "indexes"

    def persona_dir(self, persona: str | Path | None = None) -> Path:
        """A persona's folder: an id under knowledge/ (`kansai`), or any folder path (an imported card)."""
        name = str(persona or self.persona)
        if is_persona_path(name):
            return Path(name).expanduser().absolute()
        return KNOWLEDGE_ROOT / name

    def persona_key(self, persona: str | Path | None = None) -> str:
        """A file-name-safe key for the persona's caches (its index): the id, or for a folder given by path
        its name plus a hash of the absolute path (two folders of the same name never share an index)."""
        name = str(persona or self.persona)
        if not is_persona_path(name):
            return name
        folder = self.persona_dir(name)
        return f"{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:10]}"


def get_settings() -> Settings:
    """The settings from RAG_PERSONA_* variables; a bad value is one line naming the variable."""
    from pydantic import ValidationError

    # Not cached: tests and long-lived servers see environment changes.
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "RAG_PERSONA_" + "_".join(str(p) for p in first["loc"]).upper()
        raise RagPersonaError(f"{name}={first.get('input')!r}: {first['msg']}") from None
