"""What the engine serves: the persona's fact store with its retrievers, and the one loaded model.

`Knowledge` owns the store and one library retriever per mode behind one lock, so a search never sees a
half-rebuilt index. `ModelSlot` owns the loaded model and adapter and, attached on first use, the trained
cross-attention blocks (one set on the model, each persona served by it with its own fact encodings).
Neither schedules anything: the engine (ui.engine) decides when they are used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.evaluation.evaluate import resolve_adapter, shipped_adapters
from rag_persona.generation import BUNDLED, load_causal_lm
from rag_persona.generation.engines import AUTO, open_engine
from rag_persona.generation.hf_engine import TransformersBackend
from rag_persona.retrieval.retriever import retriever_for
from rag_persona.retrieval.store import open_store
from rag_persona.xattn import (
    DEFAULT_ADAPTER_DIR,
    WEIGHTS_FILE,
    XattnChat,
    decoder_layers,
    load_or_build_encodings,
    xattn_chat_for,
)

Loader = Callable[..., object]


# -- the store and its retrievers ----------------------------------------------------------------------------
class SearchAt:
    """A library retriever applied at a given threshold and k (None: the retriever's own, tuned or default).

    One `Retriever` per mode is shared, so its lexical index is built once; moving the threshold slider
    only changes the arguments of `search`.
    """

    def __init__(self, retriever, threshold: float | None = None, k: int | None = None):
        self.retriever = retriever
        self.mode = retriever.mode
        self.threshold = float(retriever.threshold if threshold is None else threshold)
        self.k = int(retriever.k if k is None else k)

    def search(self, query: str) -> list:
        return self.retriever.search(query, threshold=self.threshold, k=self.k)

    def search_turn(self, user_turn: str, history=()) -> list:
        """A chat turn read with the conversation before it (`Retriever.search_turn`)."""
        return self.retriever.search_turn(user_turn, history, threshold=self.threshold, k=self.k)

    def settings(self) -> dict:
        source = getattr(self.retriever, "threshold_source", None)
        return {"mode": self.mode, "threshold": self.threshold, "k": self.k, "threshold_source": source}


class Knowledge:
    """The fact store and one library retriever per mode; edits and searches share one lock."""

    def __init__(
        self,
        store=None,
        index: str | Path | None = None,
        progress: Callable[[str], None] = print,
        *,
        persona: str | None = None,
    ):
        """`store`, else the `index` folder, else the index of `persona` (an id or folder; None: the settings')."""
        self.store = store if store is not None else open_store(index, persona, log=progress)
        self.lock = threading.RLock()  # searches and the swap after an edit
        self._edit_lock = threading.Lock()  # one edit at a time; held while embedding, chats don't wait on it
        self._retrievers: dict[str | None, object] = {}

    def retriever(
        self, mode: str | None = None, threshold: float | None = None, k: int | None = None
    ) -> SearchAt:
        """The library's retriever for this mode (index defaults: tuned threshold, stored k) at threshold/k."""
        with self.lock:
            base = self._retrievers.get(mode)
            if base is None:
                base = self._retrievers[mode] = retriever_for(self.store, mode=mode)
            return SearchAt(base, threshold, k)

    def defaults(self, mode: str | None = None) -> dict:
        """Mode, threshold (and its source: tuned/default) and k the index gives when controls are untouched."""
        return self.retriever(mode).settings()

    def rankings(self, queries: Sequence[str], mode: str | None = None, depth: int = 50) -> list:
        """Per query, (fact id, score) best first without a threshold: the input of threshold sweeps."""
        with self.lock:
            return self.retriever(mode).retriever.rankings(list(queries), depth)

    def search(self, query: str, mode=None, threshold=None, k=None) -> list:
        with self.lock:
            return list(self.retriever(mode, threshold, k).search(query))

    def edit(self, action: str, payload) -> None:
        """add (a fact dict), update (a fact dict) or delete (ids): atomic, persisted, index updated.

        The edit (embedding included, seconds for a long fact) runs on a copy of the store outside the
        search lock, so chats keep searching the old index meanwhile; the new one is swapped in at the end.
        """
        if action not in ("add", "update", "delete"):
            raise RagPersonaError(f"knowledge: unknown action {action!r}")
        with self._edit_lock:
            new = self.store.copy()
            if action == "add":
                new.add_facts([payload])
            elif action == "update":
                new.update_fact(payload)
            else:
                new.delete_facts(payload)
            with self.lock:
                self.store = new
                self._retrievers.clear()  # retrievers hold per-store tables: rebuild after a change

    def set_threshold(self, mode: str, value: float, info: dict | None = None) -> None:
        with self._edit_lock, self.lock:  # not during an edit: its copy would drop the new threshold
            self.store.set_threshold(mode, value, info)
            if getattr(self.store, "path", None) is not None:
                self.store.save()
            self._retrievers.clear()  # retrievers hold per-store tables: rebuild after a change


# -- the model ---------------------------------------------------------------------------------------------
def xattn_weights_path(weights: str | Path | None = None) -> Path:
    path = Path(weights) if weights else DEFAULT_ADAPTER_DIR
    return path if path.suffix == ".safetensors" else path / WEIGHTS_FILE


def shipped_adapter_paths() -> list[str]:
    """The adapters shipped in the repo, for the page's adapter choice (none when a manifest is unreadable)."""
    try:
        return [a["path"] for a in shipped_adapters()]
    except RagPersonaError:
        return []


def engine_loader(engine: str = AUTO) -> Loader:
    """A loader giving the chat model on `engine` (auto: llama.cpp for GGUF models on CPU)."""

    def load(name, adapter=None, progress=print):
        return open_engine(engine, name, adapter=adapter, progress=progress)

    return load


def transformers_model(loaded):
    """The transformers model behind a loaded chat model, or None when another engine runs it."""
    if isinstance(loaded, TransformersBackend):
        return loaded.loaded
    return loaded if hasattr(loaded, "model") and hasattr(loaded, "tokenizer") else None


class ModelSlot:
    """The loaded model and adapter, and the cross-attention blocks attached to it on first use."""

    def __init__(
        self,
        model: str | None = None,
        adapter: str | None = None,
        *,
        loader: Loader | None = None,
        xattn_weights: str | Path | None = None,
        progress: Callable[[str], None] = print,
        persona: str | None = None,
    ):
        """`persona` (an id or folder; None: the settings') picks the default adapter when none is named."""
        self.loader = loader or engine_loader()
        self.progress = progress
        self.started_with = (model, adapter)  # what the command line gave: always offered for a switch
        self.name = model
        # 'none': the base model; None: the persona's default (its own adapter, else the base model)
        self.adapter = resolve_adapter(model, adapter, persona)
        self.loaded = self.loader(model, adapter=self.adapter, progress=progress)
        self._xattn_weights = xattn_weights
        self._xattn: dict[str, XattnChat] = {}  # persona id → its chat; the blocks are attached once
        self._xattn_reason = self._check_xattn()

    def _check_xattn(self) -> str | None:
        """None when cross-attention weights exist for use; otherwise why the mode is unavailable."""
        path = xattn_weights_path(self._xattn_weights)
        if not path.is_file():
            return f"no trained cross-attention weights at {path} (train them: rag-persona train xattn)"
        hf = transformers_model(self.loaded)
        if hf is None:  # another engine chats; the transformers copy for this mode loads on first use
            return None
        try:  # a model without a Llama/Qwen2-style layer stack can never take the blocks
            decoder_layers(hf.model)
        except RagPersonaError as exc:
            return str(exc)
        return None

    @property
    def xattn_available(self) -> bool:
        return self._xattn_reason is None

    @property
    def xattn_reason(self) -> str:
        if self._xattn_reason:
            return self._xattn_reason
        state = "loaded" if self._xattn else "loads on first use"
        return f"weights at {xattn_weights_path(self._xattn_weights)} ({state})"

    def label(self) -> str:
        src = getattr(self.loaded, "source", None) or self.name or "?"
        label = self.name or Path(str(src)).name
        adapter = getattr(self.loaded, "adapter", None) or self.adapter
        return f"{label} + {Path(adapter).name}" if adapter else label

    def xattn_chat(self, store, persona):
        """The persona's cross-attention chat; the trained blocks are attached to the model once, and every
        persona served by this model gets its own fact encodings (call it on the model's thread)."""
        chat = self._xattn.get(persona.id)
        if chat is not None:
            return chat
        if self._xattn_reason:
            raise RagPersonaError(f"cross-attention mode is unavailable: {self._xattn_reason}")
        first = next(iter(self._xattn.values()), None)
        if first is not None:  # the blocks are on the model already: only this persona's facts are new
            encodings = load_or_build_encodings(
                first.xmodel,
                first.loaded.tokenizer,
                store.facts,
                getattr(store, "path", None),
                knowledge_hash=getattr(store, "knowledge_hash", None),
                progress=self.progress,
            )
            chat = XattnChat(
                persona=persona, retriever=None, loaded=first.loaded, xmodel=first.xmodel, encodings=encodings
            )
            self._xattn[persona.id] = chat
            return chat
        hf = transformers_model(self.loaded)
        if hf is None:  # prompt mode runs on llama.cpp or a server: this mode needs the torch model
            self.progress(f"cross-attention mode: loading {self.name or 'the chat model'} in transformers")
            hf = load_causal_lm(self.name, adapter=self.adapter, progress=self.progress)
            decoder_layers(hf.model)
        try:
            chat = xattn_chat_for(
                hf,
                store,
                None,
                persona,
                weights=xattn_weights_path(self._xattn_weights),
                progress=self.progress,
            )
        except RagPersonaError as exc:  # e.g. weights trained on another base: the mode stays off
            self._xattn_reason = str(exc)
            raise
        self._xattn[persona.id] = chat
        return chat

    def offered_models(self) -> list[str]:
        """What a switch may load: the bundled models (`rag-persona models list`) and the one started with."""
        first = self.started_with[0]
        return [*BUNDLED, *([first] if first and first not in BUNDLED else [])]

    def offered_adapters(self) -> list[str]:
        """Adapters a switch may apply besides the default: 'none', the shipped ones and the one started with."""
        first = self.started_with[1]
        shipped = shipped_adapter_paths()
        return ["none", *shipped, *([first] if first and first not in ("none", *shipped) else [])]

    def check_offered(self, model: str | None, adapter: str | None) -> None:
        """Refuse a model or adapter this server does not offer (no arbitrary hub id or local path)."""
        if model is not None and model not in self.offered_models():
            raise RagPersonaError(
                f"model {model!r}: not offered here; choose one of {', '.join(self.offered_models())} "
                "(start the server with --model to serve another)"
            )
        if adapter is not None and adapter not in self.offered_adapters():
            raise RagPersonaError(
                f"adapter {adapter!r}: not offered here; choose the default, 'none' or a shipped adapter "
                "(start the server with --adapter to serve another)"
            )

    def switch(self, model: str | None, adapter: str | None) -> None:
        """Load model + adapter (already resolved), then swap it in; the old one serves until then."""
        loaded = self.loader(model, adapter=adapter, progress=self.progress)
        old_x = next(iter(self._xattn.values()), None)  # every persona's chat shares the one set of blocks
        self.loaded, self.name, self.adapter = loaded, model, adapter
        self._xattn = {}
        if old_x is not None:
            old_x.xmodel.remove_hooks()
        self._xattn_reason = self._check_xattn()
