"""Project-wide settings read from RAG_PERSONA_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
KNOWLEDGE_ROOT = REPO_ROOT / "knowledge"


def _default_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rag-persona"


class Settings(BaseSettings):
    """Where caches live and which models and persona are used when none is named."""

    model_config = SettingsConfigDict(env_prefix="RAG_PERSONA_")

    home: Path = _default_home()
    chat_model: str = "qwen2.5-coder-0.5b"
    embedder: str = "e5-small"
    persona: str = "ojousama"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def indexes_dir(self) -> Path:
        return self.home / "indexes"

    def persona_dir(self, persona: str | None = None) -> Path:
        return KNOWLEDGE_ROOT / (persona or self.persona)


def get_settings() -> Settings:
    # Not cached: tests and long-lived servers see environment changes.
    return Settings()
