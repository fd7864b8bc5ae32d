"""One model instance shared by every user of the app and the API: retrieval in the caller, generation in a queue.

A turn is *planned* in the caller's thread (retrieval + the one prompt builder, so the context is known at
once) and then *queued*: a single worker thread owns the model and runs one generation at a time, first come
first served. The caller reads the job's events (queue position, text pieces, the finished reply) from a
private queue, so conversations never share state. A caller that goes away cancels its job: a queued job is
skipped, a running one stops at the next token (a stopping criterion), so the model is never left busy for
nobody. Model/adapter switches and the cross-attention load run as jobs too, so they wait for the current
generation instead of pulling the model out from under it.

Knowledge edits and retrieval share one lock, so a search never sees a half-rebuilt index.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from rag_persona.chat import TurnPlan, default_persona, plan_turn
from rag_persona.errors import RagPersonaError
from rag_persona.generation import GenerationSettings, Reply, ReplyStream
from rag_persona.prompts import MAX_HISTORY_TURNS, Persona, check_user_turn

RETRIEVAL_MODES = ("dense", "hybrid")
CONTEXT_MODES = ("prompt", "xattn")
DEFAULT_MAX_WAITING = 32


class EngineBusy(RagPersonaError):
    """The generation queue is full; the caller should retry later."""


class Cancelled(RagPersonaError):
    """The job was cancelled before it finished."""


# -- retrieval ---------------------------------------------------------------------------------------
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

    def settings(self) -> dict:
        source = getattr(self.retriever, "threshold_source", None)
        return {"mode": self.mode, "threshold": self.threshold, "k": self.k, "threshold_source": source}


@dataclass
class _Hit:
    fact_id: str
    text: str
    score: float


class _Retrieved:
    """Hands already-retrieved facts to a library turn (so a job's facts are never retrieved twice)."""

    def __init__(self, facts):
        self.hits = [_Hit(f.id, f.text, f.score) for f in facts]

    def search(self, query: str) -> list[_Hit]:
        return list(self.hits)


# -- generation that can be stopped ------------------------------------------------------------------
def _stop_when(event: threading.Event):
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full(
                (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return _Stop()


@dataclass
class _CancellableSettings(GenerationSettings):
    cancel: threading.Event | None = None

    def to_generate_kwargs(self) -> dict:
        kwargs = super().to_generate_kwargs()
        if self.cancel is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_stop_when(self.cancel)])
        return kwargs


# -- jobs -----------------------------------------------------------------------------------------------
@dataclass
class TurnOptions:
    """Per-turn settings: retrieval (None = the index's defaults), context mode, decoding."""

    mode: str | None = None
    threshold: float | None = None
    k: int | None = None
    context_mode: str = "prompt"
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in RETRIEVAL_MODES:
            raise RagPersonaError(f"retrieval mode {self.mode!r} is not one of {', '.join(RETRIEVAL_MODES)}")
        if self.context_mode not in CONTEXT_MODES:
            raise RagPersonaError(
                f"context mode {self.context_mode!r} is not one of {', '.join(CONTEXT_MODES)}"
            )
        if self.k is not None and not 1 <= int(self.k) <= 50:
            raise RagPersonaError(f"k must be between 1 and 50, got {self.k}")


class Job:
    """One queued unit of work; its events are private to the caller that submitted it."""

    _ids = itertools.count(1)

    def __init__(self, kind: str, plan: TurnPlan | None = None, options: TurnOptions | None = None, fn=None):
        self.id = next(self._ids)
        self.history: list[dict] = []
        self.user_turn = ""
        self.kind = kind
        self.plan = plan
        self.options = options
        self.fn = fn
        self.cancel_event = threading.Event()
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self._events: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def put(self, kind: str, value=None) -> None:
        self._events.put((kind, value))

    def next_event(self, timeout: float | None = None):
        """(kind, value) or None on timeout; kinds: queued (position), start, piece, done (Reply), error."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self, timeout: float = 600.0) -> Iterator[tuple[str, object]]:
        """Every event until done/error; cancels the job if the consumer stops early."""
        deadline = time.monotonic() + timeout
        finished = False
        try:
            while True:
                ev = self.next_event(timeout=0.5)
                if ev is None:
                    if time.monotonic() > deadline:
                        raise RagPersonaError(f"generation: no result within {timeout:.0f}s")
                    continue
                yield ev
                if ev[0] in ("done", "error"):
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel()

    def wait(self, timeout: float = 600.0):
        """Block until the job ends; return its result or raise its error."""
        if not self.done.wait(timeout):
            self.cancel()
            raise RagPersonaError(f"job: no result within {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        return self.result


# -- the engine ----------------------------------------------------------------------------------------
Loader = Callable[..., object]


def _default_loader(name, adapter=None, progress=print):
    from rag_persona.generation import load_causal_lm

    return load_causal_lm(name, adapter=adapter, progress=progress)


def resolve_default_adapter(model: str | None, adapter: str | None) -> str | None:
    """An explicit adapter ('none' for the base model), else the chat's default adapter for this model."""
    try:
        from rag_persona.evaluation.evaluate import resolve_adapter
    except ImportError:  # the default-adapter logic lives with evaluation; absent → no adapter
        return None if adapter in (None, "", "none", "base") else adapter
    return resolve_adapter(model, adapter)


def xattn_weights_path(weights: str | Path | None = None) -> Path | None:
    try:
        from rag_persona.xattn import DEFAULT_ADAPTER_DIR, WEIGHTS_FILE
    except ImportError:
        return None
    path = Path(weights) if weights else DEFAULT_ADAPTER_DIR
    return path if path.suffix == ".safetensors" else path / WEIGHTS_FILE


class Engine:
    """The persona, its index, and one model behind a FIFO generation queue."""

    def __init__(
        self,
        model: str | None = None,
        adapter: str | None = None,
        *,
        store=None,
        index: str | Path | None = None,
        persona: Persona | str | None = None,
        loader: Loader | None = None,
        xattn_weights: str | Path | None = None,
        max_waiting: int = DEFAULT_MAX_WAITING,
        progress: Callable[[str], None] = print,
    ):
        from rag_persona.retrieval.store import default_store, load_index

        self.progress = progress
        self.persona = persona if isinstance(persona, Persona) else default_persona(persona)
        if store is None:
            store = load_index(index) if index else default_store(None, log=progress)
        self.store = store
        self.loader = loader or _default_loader
        self.max_waiting = max_waiting
        self.model_name = model
        self.adapter = resolve_default_adapter(model, adapter)
        self.loaded = self.loader(model, adapter=self.adapter, progress=progress)
        self._store_lock = threading.RLock()
        self._retrievers: dict[str | None, object] = {}  # one library Retriever per mode
        self._cv = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._served = 0
        self._xattn_weights = xattn_weights
        self._xattn = None
        self._xattn_reason = self._check_xattn()
        self._worker = threading.Thread(target=self._work, name="rag-persona-model", daemon=True)
        self._worker.start()

    # -- status ----------------------------------------------------------------------------------------
    def _check_xattn(self) -> str | None:
        """None when cross-attention weights exist for use; otherwise why the mode is unavailable."""
        path = xattn_weights_path(self._xattn_weights)
        if path is None:
            return "rag_persona.xattn.model is not installed in this build"
        if not path.is_file():
            return f"no trained cross-attention weights at {path} (train them: rag-persona train xattn)"
        from rag_persona.xattn import decoder_layers

        try:  # a model without a Llama/Qwen2-style layer stack can never take the blocks
            decoder_layers(self.loaded.model)
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
        state = "loaded" if self._xattn is not None else "loads on first use"
        return f"weights at {xattn_weights_path(self._xattn_weights)} ({state})"

    def model_label(self) -> str:
        loaded = self.loaded
        src = getattr(loaded, "source", None) or self.model_name or "?"
        label = self.model_name or Path(str(src)).name
        adapter = getattr(loaded, "adapter", None) or self.adapter
        return f"{label} + {Path(adapter).name}" if adapter else label

    def info(self) -> dict:
        loaded = self.loaded
        with self._cv:
            waiting, busy = len(self._pending), self._running is not None
        return {
            "persona": self.persona.name,
            "model": self.model_name or getattr(loaded, "source", None),
            "source": getattr(loaded, "source", None),
            "adapter": getattr(loaded, "adapter", None) or self.adapter,
            "device": getattr(loaded, "device", None),
            "dtype": getattr(loaded, "dtype", None),
            "index": str(getattr(self.store, "path", None)),
            "facts": len(self.store.facts),
            "xattn": {"available": self.xattn_available, "reason": self.xattn_reason},
            "queue": {"waiting": waiting, "busy": busy, "served": self._served, "limit": self.max_waiting},
            "max_history_turns": MAX_HISTORY_TURNS,
        }

    # -- retrieval ---------------------------------------------------------------------------------------
    def retriever(
        self, mode: str | None = None, threshold: float | None = None, k: int | None = None
    ) -> SearchAt:
        """The library's retriever for this mode (index defaults: tuned threshold, stored k) at threshold/k."""
        from rag_persona.retrieval.retriever import retriever_for

        with self._store_lock:
            base = self._retrievers.get(mode)
            if base is None:
                base = self._retrievers[mode] = retriever_for(self.store, mode=mode)
            return SearchAt(base, threshold, k)

    def defaults(self, mode: str | None = None) -> dict:
        """Mode, threshold (and its source: tuned/default) and k the index gives when controls are untouched."""
        return self.retriever(mode).settings()

    def rankings(self, queries: Sequence[str], mode: str | None = None, depth: int = 50) -> list:
        """Per query, (fact id, score) best first without a threshold: the input of threshold sweeps."""
        with self._store_lock:
            return self.retriever(mode).retriever.rankings(list(queries), depth)

    def search(self, query: str, mode=None, threshold=None, k=None) -> list:
        with self._store_lock:
            return list(self.retriever(mode, threshold, k).search(query))

    def plan(self, history: Sequence[dict], user_turn: str, options: TurnOptions | None = None) -> TurnPlan:
        """Retrieval and the prompt for one turn, exactly as the model will get them."""
        options = options or TurnOptions()
        user_turn = check_user_turn(user_turn)
        with self._store_lock:
            retriever = self.retriever(options.mode, options.threshold, options.k)
            return plan_turn(
                self.persona,
                retriever,
                history,
                user_turn,
                include_context=options.context_mode != "xattn",
            )

    # -- knowledge edits ---------------------------------------------------------------------------------
    def edit_store(self, action: str, payload) -> None:
        """add (a fact dict), update (a fact dict) or delete (ids): atomic, persisted, index updated."""
        with self._store_lock:
            if action == "add":
                self.store.add_facts([payload])
            elif action == "update":
                self.store.update_fact(payload)
            elif action == "delete":
                self.store.delete_facts(payload)
            else:
                raise RagPersonaError(f"knowledge: unknown action {action!r}")
            self._retrievers.clear()  # retrievers hold per-store tables: rebuild after a change

    def set_threshold(self, mode: str, value: float, info: dict | None = None) -> None:
        with self._store_lock:
            self.store.set_threshold(mode, value, info)
            if getattr(self.store, "path", None) is not None:
                self.store.save()
            self._retrievers.clear()  # retrievers hold per-store tables: rebuild after a change

    # -- the queue ---------------------------------------------------------------------------------------
    def _enqueue(self, job: Job) -> Job:
        with self._cv:
            if len(self._pending) >= self.max_waiting:
                raise EngineBusy(
                    f"busy: {len(self._pending)} requests are already waiting for the model "
                    f"(limit {self.max_waiting}); try again shortly"
                )
            self._pending.append(job)
            job.put("queued", len(self._pending) - 1 + (self._running is not None))
            self._cv.notify_all()
        return job

    def submit(self, history: Sequence[dict], user_turn: str, options: TurnOptions | None = None) -> Job:
        """Plan now (so the context is known at once), generate when the model is free."""
        options = options or TurnOptions()
        if options.context_mode == "xattn" and not self.xattn_available:
            raise RagPersonaError(f"cross-attention mode is unavailable: {self._xattn_reason}")
        plan = self.plan(history, user_turn, options)
        job = Job("turn", plan=plan, options=options)
        job.history, job.user_turn = list(history), check_user_turn(user_turn)
        return self._enqueue(job)

    def run_exclusive(self, fn: Callable[[], object], timeout: float = 1800.0):
        """Run fn on the model worker (nothing generates meanwhile) and return its result."""
        job = Job("call", fn=fn)
        with self._cv:  # control jobs are never refused for a full queue
            self._pending.append(job)
            self._cv.notify_all()
        return job.wait(timeout)

    def respond(self, history: Sequence[dict], user_turn: str, options: TurnOptions | None = None):
        """(plan, Reply) for one turn, blocking."""
        job = self.submit(history, user_turn, options)
        for kind, value in job.events():
            if kind == "error":
                raise value
        return job.plan, job.result

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                job = self._pending.popleft()
                self._running = job
                for i, waiting in enumerate(self._pending):
                    waiting.put("queued", i + 1)
            try:
                if job.cancelled:
                    raise Cancelled("cancelled while waiting")
                job.result = job.fn() if job.kind == "call" else self._generate(job)
                if job.kind == "turn":
                    job.put("done", job.result)
            except BaseException as exc:  # noqa: BLE001 - every failure is reported to the job's owner
                what = "generation" if job.kind == "turn" else "model"
                job.error = exc if isinstance(exc, RagPersonaError) else RagPersonaError(f"{what}: {exc}")
                job.put("error", job.error)
            finally:
                with self._cv:
                    self._running = None
                    self._served += job.kind == "turn"
                job.done.set()

    def _generate(self, job: Job) -> Reply:
        opts = job.options
        settings = _CancellableSettings(**vars(opts.generation), cancel=job.cancel_event)
        if opts.context_mode == "xattn":
            # the library's cross-attention turn, fed the facts already retrieved for this job
            xchat = self._xattn_chat()
            xchat.retriever, xchat.settings = _Retrieved(job.plan.context), settings
            plan, stream = xchat.stream(job.history, job.user_turn)
            if plan.messages != job.plan.messages:  # pragma: no cover - the builder is deterministic
                raise RagPersonaError("cross-attention: the prompt differs from the planned one")
        else:
            stream = ReplyStream(self.loaded, job.plan.messages, settings)
        job.put("start")
        for piece in stream:
            if piece:
                job.put("piece", piece)
        if job.cancelled:
            raise Cancelled("cancelled while generating")
        return stream.reply

    # -- model and cross-attention -----------------------------------------------------------------------
    def _xattn_chat(self):
        """Attach the trained cross-attention blocks to the shared model once (on the worker thread)."""
        if self._xattn is not None:
            return self._xattn
        if self._xattn_reason:
            raise RagPersonaError(f"cross-attention mode is unavailable: {self._xattn_reason}")
        from rag_persona.xattn import xattn_chat_for

        try:
            self._xattn = xattn_chat_for(
                self.loaded,
                self.store,
                None,
                self.persona,
                weights=xattn_weights_path(self._xattn_weights),
                progress=self.progress,
            )
        except RagPersonaError as exc:  # e.g. weights trained on another base: the mode stays off
            self._xattn_reason = str(exc)
            raise
        return self._xattn

    def switch_model(self, model: str | None, adapter: str | None = None) -> dict:
        """Load another model/adapter for everyone; the old one serves until the new one is ready."""
        adapter = resolve_default_adapter(model, adapter)

        def load():
            loaded = self.loader(model, adapter=adapter, progress=self.progress)
            old_x = self._xattn
            self.loaded, self.model_name, self.adapter = loaded, model, adapter
            self._xattn = None
            if old_x is not None:
                old_x.xmodel.remove_hooks()
            self._xattn_reason = self._check_xattn()
            return self.info()

        return self.run_exclusive(load)

    def close(self) -> None:
        with self._cv:
            for job in self._pending:
                job.cancel()


def options_from(
    mode: str | None = None,
    threshold: float | None = None,
    k: int | None = None,
    context_mode: str = "prompt",
    **generation,
) -> TurnOptions:
    base = GenerationSettings()
    gen = replace(base, **{k_: v for k_, v in generation.items() if v is not None})
    return TurnOptions(mode=mode, threshold=threshold, k=k, context_mode=context_mode, generation=gen)
