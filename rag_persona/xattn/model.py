"""XattnModel: a frozen causal LM with gated cross-attention blocks in chosen layers; its weights file.

The second chat mode. Any Llama/Qwen2-style transformers causal LM (a ``model.layers`` stack whose
layers have ``input_layernorm`` and ``self_attn.{q,k,v,o}_proj``) is wrapped *frozen*; before each
chosen decoder layer a `GatedCrossAttention` block (`layers.py`) reads the memory: for each retrieved
fact, the frozen model's *own* hidden states of the fact text at the input of that layer (XC-Llama's
"the decoder is its own encoder"). Only the blocks' deltas, norms and gates train: ~0.5M parameters for
the bundled 0.5B, saved with their config as one safetensors file (see ``bench/xattn.py`` and
``bench/results/xattn.md`` for the measured choice of memory).

The blocks run in forward pre-hooks on the base model's layers, so the base model object keeps its
own ``forward``/``generate``/KV cache untouched: set the memory on the wrapper and call the base model
(or ``XattnModel.generate``). Memory keys/values are projected once per memory under no-grad, and every
decoding step reuses them; cross-attention has no positions, so generation with and without the KV cache
gives the same tokens. With no memory set, the hooks do nothing and the base model is exactly itself.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import write_file_atomic
from rag_persona.xattn.config import WEIGHTS_FILE, XATTN_FORMAT, XattnConfig, default_layers
from rag_persona.xattn.layers import GatedCrossAttention
from rag_persona.xattn.memory import Memory


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
    """sha256 over the config and a sample of every parameter: equal for the same weights at bf16 precision.

    LoRA parameters of a peft-wrapped model are left out (cross-attention runs with the adapter disabled),
    so a base model fingerprints the same with or without the chat's adapter attached.
    """
    base = core_model(base)
    cfg = base.config.to_dict()
    for volatile in ("_name_or_path", "name_or_path", "transformers_version", "_attn_implementation_autoset"):
        cfg.pop(volatile, None)
    if "dtype" in cfg:  # the dtype it is held in, not what it is: hashed at bf16 precision (below)
        cfg["dtype"] = "bfloat16"
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        params = {n.replace(".base_layer.", "."): p for n, p in base.named_parameters() if "lora_" not in n}
        for name, p in sorted(params.items(), key=lambda kv: kv[0]):
            digest.update(name.encode())
            # Hashed at bf16 precision whatever dtype holds them: the prepared base is bf16 on disk and is
            # loaded as float32 on CPUs without native bf16, which must not look like another base.
            digest.update(b"torch.bfloat16")
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64]
            digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()


class _StopEncoding(Exception):
    """Raised by the capture hook after the last chosen layer: encoding facts needs no more of the forward."""


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
        from safetensors.torch import save_file

        path = Path(path)
        target = path / WEIGHTS_FILE if path.suffix != ".safetensors" else path
        if extra:
            self.config.trained = {**self.config.trained, **extra}
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"xattn_config": self.config.to_json(), "format": str(XATTN_FORMAT)}
        return write_file_atomic(target, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

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


# The system turn: memory starts after it (its tokens never see the facts), so its KV cache is computed once.
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
