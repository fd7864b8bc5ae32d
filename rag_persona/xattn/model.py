"""Cross-attention context injection: retrieved facts enter a frozen causal LM as memory, not as prompt text.

The second chat mode. Any Llama/Qwen2-style transformers causal LM (a ``model.layers`` stack whose
layers have ``input_layernorm`` and ``self_attn.{q,k,v,o}_proj``) is wrapped *frozen*; before each
chosen decoder layer ``i`` a gated cross-attention block adds

    h ← h + tanh(α_i) · o(softmax(q(n(h)) k(n(m_i))ᵀ / √d) v(n(m_i)))          (Flamingo gate, α_i = 0)

where ``m_i`` is the memory: for each retrieved fact, the frozen model's *own* hidden states of the fact
text at the input of layer ``i`` (XC-Llama's "the decoder is its own encoder"). Because memory and query
live in the same residual stream, the blocks start from the layer's own attention projections (shared,
frozen) plus trainable low-rank deltas, and from copies of its RMSNorm; at step 0 they compute what the
layer's self-attention would compute over the fact tokens (without positions), gated off. Only the
deltas, norms and gates train: ~0.5M parameters for the bundled 0.5B, saved with their config as one
safetensors file (see ``bench/xattn.py`` and ``bench/results/xattn.md`` for the measured choice of memory).

The blocks run in forward pre-hooks on the base model's layers, so the base model object keeps its
own ``forward``/``generate``/KV cache untouched: set the memory on the wrapper and call the base model
(or ``XattnModel.generate``). Memory keys/values are projected once per memory under no-grad, and every
decoding step reuses them; cross-attention has no positions, so generation with and without the KV cache
gives the same tokens. With no memory set, the hooks do nothing and the base model is exactly itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rag_persona.errors import RagPersonaError
from rag_persona.generation.decoding import GenerationSettings, ReplyStream
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


def core_model(base):
    """The transformers model itself: a peft-wrapped model (e.g. the chat's SFT LoRA) is unwrapped."""
    if hasattr(base, "peft_config") and hasattr(base, "get_base_model"):
        return base.get_base_model()
    return base


def decoder_layers(base) -> Sequence:
    """The decoder layer stack of a Llama/Qwen2-style causal LM (or refuse in one line)."""
    base = core_model(base)
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(base, "get_decoder"):
        layers = getattr(base.get_decoder(), "layers", None)
    if layers is None or not len(layers):
        raise RagPersonaError(
            f"xattn: {type(base).__name__} has no model.layers; a Llama/Qwen2-style LM is needed"
        )
    first = layers[0]
    attn = getattr(first, "self_attn", None)
    if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise RagPersonaError(
            f"xattn: {type(first).__name__} has no self_attn.q/k/v/o_proj; unsupported layer"
        )
    if not hasattr(first, "input_layernorm"):
        raise RagPersonaError(f"xattn: {type(first).__name__} has no input_layernorm; unsupported layer")
    return layers


def model_fingerprint(base) -> str:
    """sha256 over the config and a sample of every parameter: equal for the same weights in the same dtype.

    LoRA parameters of a peft-wrapped model are left out (cross-attention runs with the adapter disabled),
    so a base model fingerprints the same with or without the chat's adapter attached.
    """
    import hashlib

    base = core_model(base)
    cfg = base.config.to_dict()
    for volatile in ("_name_or_path", "name_or_path", "transformers_version", "_attn_implementation_autoset"):
        cfg.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        params = {n.replace(".base_layer.", "."): p for n, p in base.named_parameters() if "lora_" not in n}
        for name, p in sorted(params.items(), key=lambda kv: kv[0]):
            digest.update(name.encode())
            digest.update(str(p.dtype).encode())
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64]
            digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()


# -- the block ---------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """A trainable fp32 copy of the layer's RMSNorm (same formula as Llama/Qwen2)."""

    def __init__(self, weight, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * x32.to(dtype)


class LowRank(nn.Module):
    """A LoRA-style delta B·A·x·(alpha/rank), B initialised to zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(F.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype)) * self.scale


class GatedCrossAttention(nn.Module):
    """Cross-attention from a decoder layer's input into memory, gated by tanh(gate), gate = 0 at start."""

    def __init__(self, layer, config: XattnConfig, mem_dim: int):
        super().__init__()
        attn = layer.self_attn
        self._attn = (attn,)  # the frozen projections are shared, not registered (never saved or trained)
        self.head_dim = int(
            getattr(attn, "head_dim", attn.q_proj.out_features // attn.config.num_attention_heads)
        )
        self.n_heads = attn.q_proj.out_features // self.head_dim
        self.n_kv = attn.k_proj.out_features // self.head_dim
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        hidden = attn.q_proj.in_features
        norm = layer.input_layernorm
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.q_norm = RMSNorm(norm.weight, eps)
        self.shared_kv = config.memory == "hidden"
        rank, alpha = config.rank, config.alpha
        kv_out = self.n_kv * self.head_dim
        self.q_delta = LowRank(hidden, self.n_heads * self.head_dim, rank, alpha) if rank else None
        self.o_delta = (
            LowRank(self.n_heads * self.head_dim, attn.o_proj.out_features, rank, alpha) if rank else None
        )
        if self.shared_kv:
            self.m_norm = RMSNorm(norm.weight, eps)
            self.k_delta = LowRank(mem_dim, kv_out, rank, alpha) if rank else None
            self.v_delta = LowRank(mem_dim, kv_out, rank, alpha) if rank else None
        else:
            # A foreign encoder's space: fresh full key/value maps (small std so the start is tame).
            self.m_norm = nn.LayerNorm(mem_dim)
            self.k_proj = nn.Linear(mem_dim, kv_out)
            self.v_proj = nn.Linear(mem_dim, kv_out)
            for lin in (self.k_proj, self.v_proj):
                nn.init.normal_(lin.weight, std=mem_dim**-0.5)
                nn.init.zeros_(lin.bias)
        self.gate = nn.Parameter(torch.zeros(1))

    @staticmethod
    def _add(base_out, delta, x):
        return base_out if delta is None else base_out + delta(x)

    def memory_kv(self, memory, mask):
        """(B, M, D) memory + (B, M) mask → keys and values (B, kv_heads, M, head_dim), ready to attend."""
        attn = self._attn[0]
        b, m, _ = memory.shape
        if self.shared_kv:
            dtype = attn.k_proj.weight.dtype
            x = self.m_norm(memory.to(dtype))
            k = self._add(attn.k_proj(x), self.k_delta, x)
            v = self._add(attn.v_proj(x), self.v_delta, x)
        else:
            dtype = attn.q_proj.weight.dtype
            x = self.m_norm(memory.float())
            k, v = self.k_proj(x).to(dtype), self.v_proj(x).to(dtype)
        k = k.view(b, m, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, m, self.n_kv, self.head_dim).transpose(1, 2)
        return k, v, mask

    def forward(self, hidden, kv, query_mask=None):
        k, v, mask = kv
        attn = self._attn[0]
        b, t, _ = hidden.shape
        if k.shape[0] != b:
            if k.shape[0] != 1:
                raise RagPersonaError(f"xattn: memory batch {k.shape[0]} does not match input batch {b}")
            k, v, mask = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), mask.expand(b, -1)
        x = self.q_norm(hidden)
        q = self._add(attn.q_proj(x), self.q_delta, x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        has = mask.any(dim=-1)
        safe = mask | ~has[:, None]  # an item without memory attends to its padding, then is zeroed
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=safe[:, None, None, :], scale=self.scaling
        )
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        out = self._add(attn.o_proj(out), self.o_delta, out)
        if not bool(has.all()):
            out = out * has[:, None, None].to(out.dtype)
        if query_mask is not None:
            out = out * query_mask[..., None].to(out.dtype)
        return hidden + torch.tanh(self.gate).to(hidden.dtype) * out


@dataclass
class Memory:
    """Memory for one batch: per item, the concatenated encodings of its facts.

    states: (B, S, M, D) – S = one slice per cross-attention layer ("hidden") or 1 shared slice ("e5");
    mask: (B, M) bool, True where a memory token is real.
    start: positions before it never see the memory. Chat and training use the end of the system turn: as
    in prompt mode, where the instruction precedes the context block, its tokens (and their KV cache) do
    not depend on the facts. None means "after the system turn", resolved by `XattnReplyStream` from the
    prompt (a plain forward treats None as 0).
    """

    states: object
    mask: object
    fact_ids: list[list[str]] = field(default_factory=list)
    start: int | None = None

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def empty(self) -> bool:
        return self.mask.numel() == 0 or not bool(self.mask.any())


class _StopEncoding(Exception):
    pass


class XattnModel(nn.Module):
    """A frozen causal LM plus gated cross-attention blocks in chosen layers; only the blocks are parameters.

    ``base`` is held, not registered: ``parameters()``/``state_dict()`` are the cross-attention weights only.
    """

    def __init__(self, base, config: XattnConfig | None = None, *, base_name: str = ""):
        super().__init__()
        layers = decoder_layers(base)
        config = config or XattnConfig()
        if not config.layers:
            config.layers = default_layers(len(layers))
        bad = [i for i in config.layers if not 0 <= i < len(layers)]
        if bad:
            raise RagPersonaError(
                f"xattn: field 'layers': layer {bad[0]} does not exist (model has {len(layers)})"
            )
        if len(set(config.layers)) != len(config.layers):
            raise RagPersonaError("xattn: field 'layers': duplicate layer")
        config.layers = sorted(config.layers)
        object.__setattr__(self, "base", base)
        core = core_model(base)
        object.__setattr__(self, "core", core)
        base.requires_grad_(False)
        fingerprint = model_fingerprint(core)
        if not config.base_fingerprint:
            config.base_fingerprint = fingerprint
        config.base = config.base or base_name or str(getattr(core.config, "_name_or_path", ""))
        self.fingerprint = fingerprint
        self.config = config
        hidden = int(core.config.hidden_size)
        mem_dim = hidden if config.memory == "hidden" else 384
        device = next(base.parameters()).device
        self.blocks = torch.nn.ModuleDict(
            {str(i): GatedCrossAttention(layers[i], config, mem_dim) for i in config.layers}
        ).to(device)
        self._slot = {i: n for n, i in enumerate(config.layers)}
        self._memory: Memory | None = None
        self._kv: dict[int, tuple] = {}
        self._capture: dict[int, object] | None = None
        self._lock = threading.RLock()
        self._handles = [
            layers[i].register_forward_pre_hook(self._make_hook(i), with_kwargs=True) for i in config.layers
        ]

    # -- plumbing ------------------------------------------------------------------------------------
    def _make_hook(self, idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self._capture is not None:
                self._capture[idx] = hidden.detach()
                if idx == self.config.layers[-1]:
                    raise _StopEncoding
                return None
            memory = self._memory
            if memory is None or memory.empty:
                return None
            query_mask = None
            if memory.start:
                positions = kwargs.get("position_ids")
                if positions is None:
                    raise RagPersonaError("xattn: memory.start needs position_ids from the model's forward")
                query_mask = positions >= memory.start
                if not bool(query_mask.any()):
                    return None
            block = self.blocks[str(idx)]
            kv = self._kv.get(idx)
            if kv is None:
                slot = min(self._slot[idx], memory.states.shape[1] - 1)
                kv = block.memory_kv(memory.states[:, slot].to(hidden.device), memory.mask.to(hidden.device))
                if not torch.is_grad_enabled():
                    self._kv[idx] = kv  # fixed for this memory: decoding steps reuse it
            out = block(hidden, kv, query_mask)
            if args:
                return (out, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": out}

        return hook

    def remove_hooks(self) -> None:
        """Detach the blocks from the base model (the base is then exactly itself again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def set_memory(self, memory: Memory | None) -> None:
        self._memory = memory
        self._kv = {}

    def adapter_off(self):
        """A peft adapter on the shared model is off in this mode: the blocks were trained on the base."""
        if hasattr(self.base, "peft_config") and hasattr(self.base, "disable_adapter"):
            return self.base.disable_adapter()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def using(self, memory: Memory | None) -> Iterator[None]:
        """Set the memory for the duration of a block (one generation or forward at a time)."""
        with self._lock, self.adapter_off():
            previous = self._memory
            self.set_memory(memory)
            try:
                yield
            finally:
                self.set_memory(previous)

    @property
    def device(self):
        return next(self.base.parameters()).device

    @property
    def dtype(self):
        return next(self.base.parameters()).dtype

    @property
    def generation_config(self):
        return self.base.generation_config

    def forward(self, *args, memory: Memory | None = None, **kwargs):
        with self.using(memory):
            return self.base(*args, **kwargs)

    def generate(self, *args, memory: Memory | None = None, **kwargs):
        with self.using(memory):
            return self.base.generate(*args, **kwargs)

    # -- memory ---------------------------------------------------------------------------------------
    def encode_facts(self, tokenizer, texts: Sequence[str], batch_size: int = 16) -> list:
        """Encode fact texts with the frozen base (no cross-attention): one (S, T, D) tensor per fact."""
        if self.config.memory == "e5":
            from rag_persona.retrieval.embedders import load_embedder

            vectors = load_embedder("e5-small").encode_passages(list(texts))
            return [torch.from_numpy(v.copy()).view(1, 1, -1) for v in vectors]
        out: list = []
        texts = [self.config.fact_template.format(text=t) for t in texts]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            ids = [
                tokenizer(t, add_special_tokens=False)["input_ids"][: self.config.max_fact_tokens] or [pad]
                for t in chunk
            ]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            attention = torch.zeros((len(ids), width), dtype=torch.long)
            for row, x in enumerate(ids):  # right padding: causal attention keeps real tokens exact
                input_ids[row, : len(x)] = torch.tensor(x)
                attention[row, : len(x)] = 1
            captured: dict[int, object] = {}
            with self._lock, self.adapter_off(), torch.no_grad():
                saved, self._capture = self._memory, captured
                try:
                    self.base(
                        input_ids=input_ids.to(self.device),
                        attention_mask=attention.to(self.device),
                        use_cache=False,
                    )
                except _StopEncoding:
                    pass
                finally:
                    self._capture, self._memory = None, saved
            stacked = torch.stack([captured[i] for i in self.config.layers], dim=1).cpu()  # (n, S, T, D)
            for row, x in enumerate(ids):
                out.append(stacked[row, :, : len(x)].contiguous())
        return out

    def memory_for(
        self,
        batch: Sequence[Sequence],
        fact_ids: Sequence[Sequence[str]] | None = None,
        *,
        start: int | None = None,
    ) -> Memory:
        """Pack per-item lists of fact encodings (each (S, T, D)) into one padded `Memory`."""
        slots = len(self.config.layers) if self.config.memory == "hidden" else 1
        dim = int(self.core.config.hidden_size) if self.config.memory == "hidden" else 384
        lengths = [sum(int(e.shape[1]) for e in item) for item in batch]
        width = max(lengths, default=0)
        dtype = self.dtype if self.config.memory == "hidden" else torch.float32
        states = torch.zeros((len(batch), slots, width, dim), dtype=dtype)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, item in enumerate(batch):
            if item:
                cat = torch.cat([e.to(dtype) for e in item], dim=1)
                states[row, :, : cat.shape[1]] = cat
                mask[row, : cat.shape[1]] = True
        return Memory(
            states.to(self.device), mask.to(self.device), [list(x) for x in (fact_ids or [])], start
        )

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the cross-attention weights (fp32) and config as one safetensors file, atomically."""
        import os
        import tempfile

        from safetensors.torch import save_file

        path = Path(path)
        target = path / WEIGHTS_FILE if path.suffix != ".safetensors" else path
        target.parent.mkdir(parents=True, exist_ok=True)
        if extra:
            self.config.trained = {**self.config.trained, **extra}
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            save_file(
                tensors, tmp, metadata={"xattn_config": self.config.to_json(), "format": str(XATTN_FORMAT)}
            )
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are shared
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(
        cls, base, path: str | Path, *, strict_fingerprint: bool = True, base_name: str = ""
    ) -> XattnModel:
        """Attach saved cross-attention weights to a base model; refuse weights trained on another base."""
        config, tensors = read_weights(path)
        model = cls(base, XattnConfig.from_json(config.to_json()), base_name=base_name)
        if strict_fingerprint and config.base_fingerprint and model.fingerprint != config.base_fingerprint:
            model.remove_hooks()
            raise RagPersonaError(
                f"{path}: cross-attention weights were trained on another base model "
                f"(fingerprint {config.base_fingerprint[:12]} != {model.fingerprint[:12]}; base {config.base!r})"
            )
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            model.remove_hooks()
            raise RagPersonaError(
                f"{path}: weights do not match the config (missing {missing[:2]}, extra {unexpected[:2]})"
            )
        return model

    def gates(self) -> dict[int, float]:
        return {int(k): float(torch.tanh(b.gate.detach()).item()) for k, b in self.blocks.items()}


def read_weights(path: str | Path) -> tuple[XattnConfig, dict]:
    """(config, tensors) from a weights file or a folder holding one; one-line errors."""
    from safetensors import safe_open

    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise RagPersonaError(
            f"{file}: no cross-attention weights here (train them: rag-persona train xattn)"
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one line
        raise RagPersonaError(f"{file}: not a readable safetensors file ({exc})") from None
    if "xattn_config" not in meta:
        raise RagPersonaError(f"{file}: field 'xattn_config': missing from the safetensors metadata")
    config = XattnConfig.from_json(meta["xattn_config"])
    if config.format != XATTN_FORMAT:
        raise RagPersonaError(f"{file}: field 'format': {config.format} is not {XATTN_FORMAT}; retrain")
    return config, tensors


# -- the system message: memory starts after it, its KV cache is computed once -----------------------
def system_prefix_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids of the system turn as the chat template renders it, if they prefix the full prompt; else []."""
    if not messages or messages[0].get("role") != "system":
        return []

    def ids(msgs, gen):
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)
        return [int(i) for i in out["input_ids"]]

    head, full = ids(list(messages[:1]), False), ids(list(messages), True)
    return head if len(head) < len(full) and full[: len(head)] == head else []


class PrefixCache:
    """The base model's KV cache for a fixed prompt prefix, computed once (no grad) and copied per use."""

    def __init__(self, model, ids: Sequence[int]):
        self.ids = [int(i) for i in ids]
        device = next(model.parameters()).device
        with torch.no_grad():
            self.cache = model(
                input_ids=torch.tensor([self.ids], device=device), use_cache=True
            ).past_key_values

    def __len__(self) -> int:
        return len(self.ids)

    def matches(self, input_ids) -> bool:
        row = input_ids[0].tolist() if hasattr(input_ids, "tolist") else list(input_ids)
        return len(row) > len(self.ids) and row[: len(self.ids)] == self.ids

    def copy(self, batch: int = 1):
        """A private copy (generate and training extend it), repeated for a batch if asked."""
        out = copy.deepcopy(self.cache)
        if batch > 1:
            out.batch_repeat_interleave(batch)
        return out


# -- chat in this mode --------------------------------------------------------------------------------
def load_xattn(
    model: str | None = None,
    weights: str | Path | None = None,
    *,
    progress=print,
    allow_untrained: bool = False,
):
    """(LoadedModel, XattnModel): the base model with trained cross-attention attached.

    weights defaults to adapters/xattn/ (trained on the bundled 0.5B). Without weights for this base the
    call refuses unless allow_untrained (gates at 0: the memory then has no effect at all).
    """
    from rag_persona.generation.llm import load_causal_lm

    loaded = load_causal_lm(model, progress=progress)
    path = Path(weights) if weights else DEFAULT_ADAPTER_DIR
    if (path / WEIGHTS_FILE).is_file() or path.is_file():
        xmodel = XattnModel.load(loaded.model, path, base_name=model or "")
        loaded.adapter = str(path)
    elif weights or not allow_untrained:
        raise RagPersonaError(f"{path}: no cross-attention weights (train them: rag-persona train xattn)")
    else:
        xmodel = XattnModel(loaded.model, base_name=model or "")
    loaded.info["xattn"] = {"layers": xmodel.config.layers, "gates": xmodel.gates(), "weights": str(path)}
    return loaded, xmodel


@dataclass
class XattnChat:
    """Like `rag_persona.chat.PersonaChat`, but the retrieved facts go in as cross-attention memory.

    The prompt is `build_messages(..., include_context=False)`: identical to prompt mode minus the
    context block. Fact encodings come from the cache in the index folder (computed once).
    """

    persona: object
    retriever: object | None
    loaded: object
    xmodel: XattnModel
    settings: object = None
    encodings: object = None  # rag_persona.xattn.memory.FactEncodings

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = GenerationSettings()

    use_prefix_cache: bool = True
    _prefix: PrefixCache | None = field(default=None, repr=False)

    def memory(self, facts: Sequence, start: int | None = None) -> Memory:
        from rag_persona.xattn.memory import encodings_for

        encs = encodings_for(self.xmodel, self.loaded.tokenizer, facts, self.encodings)
        return self.xmodel.memory_for([encs], [[f.id for f in facts]], start=start)

    def prefix_for(self, messages: Sequence[dict]) -> PrefixCache | None:
        """The cached system turn (the same every turn in this mode); None if it does not prefix the prompt."""
        ids = system_prefix_ids(self.loaded.tokenizer, messages)
        if not ids:
            return None
        if self._prefix is None or self._prefix.ids != ids:
            with self.xmodel.using(None):
                self._prefix = PrefixCache(self.loaded.model, ids)
        return self._prefix

    def stream(self, history: Sequence[dict], user_turn: str):
        from rag_persona.chat import plan_turn

        plan = plan_turn(self.persona, self.retriever, history, user_turn, include_context=False)
        prefix = self.prefix_for(plan.messages)
        memory = self.memory(plan.context, start=len(prefix) if prefix is not None else None)
        stream = XattnReplyStream(
            self.loaded,
            plan.messages,
            self.settings,
            xmodel=self.xmodel,
            memory=memory,
            prefix=prefix if self.use_prefix_cache else None,
        )
        return plan, stream

    def respond(self, history: Sequence[dict], user_turn: str):
        from rag_persona.chat import TurnResult

        plan, stream = self.stream(history, user_turn)
        for _ in stream:
            pass
        return TurnResult(plan=plan, reply=stream.reply)

    def iter_text(self, history: Sequence[dict], user_turn: str) -> Iterator[str]:
        _, stream = self.stream(history, user_turn)
        yield from stream


class _PrefixedSettings:
    """Wraps any generation settings so `generate` also gets a fresh copy of a prefix KV cache.

    Wrapping rather than copying fields keeps a caller's own `to_generate_kwargs` (e.g. logits processors).
    """

    def __init__(self, inner, prefix: PrefixCache):
        self.inner, self.prefix = inner, prefix

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def to_generate_kwargs(self) -> dict:
        return {**self.inner.to_generate_kwargs(), "past_key_values": self.prefix.copy()}


class XattnReplyStream(ReplyStream):
    """A ReplyStream that holds its memory on the model while it generates (one generation at a time).

    With a prefix cache whose ids start the prompt, only the rest of the prompt is prefilled.
    """

    def __init__(
        self,
        loaded,
        messages,
        settings=None,
        *,
        xmodel: XattnModel,
        memory: Memory | None,
        prefix: PrefixCache | None = None,
    ):
        super().__init__(loaded, messages, settings)
        self.xmodel = xmodel
        self.memory = memory
        self.prefix = prefix
        self.prefilled_tokens: int | None = None

    def __iter__(self):
        from rag_persona.generation.decoding import encode_messages

        ids = encode_messages(self.loaded.tokenizer, self.messages)
        if self.memory is not None and self.memory.start is None:
            head = system_prefix_ids(self.loaded.tokenizer, self.messages)
            self.memory = dataclasses.replace(self.memory, start=len(head))
        prefix = self.prefix if self.prefix is not None and self.prefix.matches(ids) else None
        if (
            prefix is not None
            and self.memory is not None
            and not self.memory.empty
            and self.memory.start < len(prefix)
        ):
            prefix = None  # the memory reaches into the prefix: it cannot come from the cache
        self.prefilled_tokens = int(ids.shape[1]) - (len(prefix) if prefix is not None else 0)
        if prefix is not None:
            self.settings = _PrefixedSettings(self.settings, prefix)
        with self.xmodel.using(self.memory):
            yield from super().__iter__()


def xattn_chat_for(
    loaded, store, retriever, persona, settings=None, weights=None, progress=print
) -> XattnChat:
    """Cross-attention mode over an already loaded model, index and retriever (what `evaluate` needs).

    The model may carry a peft adapter (the prompt mode's default): it is switched off while this mode runs.
    """
    from rag_persona.xattn.memory import load_or_build_encodings

    path = Path(weights) if weights else DEFAULT_ADAPTER_DIR
    xmodel = XattnModel.load(loaded.model, path, base_name=getattr(loaded, "source", "") or "")
    encodings = load_or_build_encodings(
        xmodel,
        loaded.tokenizer,
        store.facts,
        getattr(store, "path", None),
        knowledge_hash=getattr(store, "knowledge_hash", None),
        progress=progress,
    )
    return XattnChat(
        persona=persona,
        retriever=retriever,
        loaded=loaded,
        xmodel=xmodel,
        settings=settings,
        encodings=encodings,
    )


def load_xattn_chat(
    model: str | None = None,
    weights: str | Path | None = None,
    *,
    index: str | Path | None = None,
    persona: str | None = None,
    settings=None,
    retriever=None,
    store=None,
    progress=print,
    allow_untrained: bool = False,
) -> XattnChat:
    """The persona, its index's retriever, the base model with cross-attention, and cached fact encodings."""
    from rag_persona.chat import default_persona
    from rag_persona.retrieval.store import default_store, load_index
    from rag_persona.xattn.memory import load_or_build_encodings

    if store is None:
        store = load_index(index) if index else default_store(persona, log=progress)
    if retriever is None:
        try:
            from rag_persona.retrieval.retriever import retriever_for
        except ImportError as exc:  # pragma: no cover - retrieval not wired yet
            raise RagPersonaError("retrieval: rag_persona.retrieval.retriever has no retriever_for yet") from exc
        retriever = retriever_for(store)
    loaded, xmodel = load_xattn(model, weights, progress=progress, allow_untrained=allow_untrained)
    encodings = load_or_build_encodings(
        xmodel,
        loaded.tokenizer,
        store.facts,
        store.path,
        knowledge_hash=store.knowledge_hash,
        progress=progress,
    )
    return XattnChat(
        persona=default_persona(persona),
        retriever=retriever,
        loaded=loaded,
        xmodel=xmodel,
        settings=settings,
        encodings=encodings,
    )
