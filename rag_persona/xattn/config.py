"""What the cross-attention blocks are (XattnConfig) and where and in which format their weights are saved."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from rag_persona.errors import RagPersonaError
from rag_persona.settings import REPO_ROOT

XATTN_FORMAT = 1
WEIGHTS_FILE = "xattn.safetensors"
DEFAULT_ADAPTER_DIR = REPO_ROOT / "adapters" / "xattn"
MEMORY_KINDS = ("hidden", "e5")


def default_layers(num_layers: int, count: int = 6) -> list[int]:
    """Evenly spaced layers from a quarter of the depth up: 24 layers → 6, 9, 12, 15, 18, 21."""
    count = max(1, min(count, num_layers))
    start = num_layers // 4
    step = max(1, (num_layers - start) // count)
    return list(range(start, num_layers, step))[:count]


@dataclass
class XattnConfig:
    """What the cross-attention blocks are and how facts are encoded; saved inside the weights file.

    memory: "hidden" – the frozen model's own hidden states of each fact at the input of each chosen
    layer (token level, default); "e5" – one pooled multilingual-e5-small vector per fact, projected by
    fresh trainable key/value maps (the small-encoder alternative, kept for the measurement).
    """

    layers: list[int] = field(default_factory=list)
    rank: int = 16
    alpha: float = 32.0
    memory: str = "hidden"
    fact_template: str = "- {text}"
    max_fact_tokens: int = 64
    base: str = ""
    base_fingerprint: str = ""
    format: int = XATTN_FORMAT
    trained: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.memory not in MEMORY_KINDS:
            raise RagPersonaError(
                f"xattn: field 'memory': {self.memory!r} is not one of {', '.join(MEMORY_KINDS)}"
            )
        if self.rank < 0:
            raise RagPersonaError(f"xattn: field 'rank': must be >= 0, got {self.rank}")
        if "{text}" not in self.fact_template:
            raise RagPersonaError("xattn: field 'fact_template': must contain {text}")

    def encoder_key(self) -> dict:
        """Everything a cached fact encoding depends on besides the base model and the fact text."""
        if self.memory == "e5":
            return {"memory": "e5", "embedder": "e5-small"}
        return {
            "memory": self.memory,
            "layers": list(self.layers),
            "fact_template": self.fact_template,
            "max_fact_tokens": self.max_fact_tokens,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> XattnConfig:
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
