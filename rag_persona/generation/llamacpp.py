"""The llama.cpp engine (llama-cpp-python): the bundled 4-bit GGUF as it is, a GGUF LoRA, prefix reuse across turns."""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rag_persona.errors import RagPersonaError
from rag_persona.generation.backend import Generation
from rag_persona.generation.gguf_lora import (
    FORMAT,
    GGUF_LORA_FILE,
    is_current,
    weights_sha256,
    write_gguf_lora,
)
from rag_persona.generation.models import BUNDLED, join_and_verify
from rag_persona.settings import get_settings
from rag_persona.utils.io import atomic_folder, file_sha256, read_json, write_json

GGUF_MARKER = "rag_persona_gguf.json"
GGUF_FILE = "model.gguf"
TOKENIZER_DIR = "tokenizer"
DEFAULT_N_CTX = 4096


def gguf_dir(alias: str, home: Path | None = None) -> Path:
    return (home or get_settings().models_dir) / f"{alias}-gguf"


def _save_tokenizer(gguf_path: Path, out: Path) -> None:
    # The same conversion the bf16 folder's tokenizer comes from, so both engines see the same ids.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(out)


def prepare_gguf(alias: str, home: Path | None = None, progress=lambda msg: None) -> Path:
    """The bundled model's joined, sha256-verified GGUF and its tokenizer, built atomically once."""
    model = BUNDLED.get(alias)
    if model is None:
        raise RagPersonaError(f"unknown bundled model {alias!r}; known: {', '.join(BUNDLED)}")
    target = gguf_dir(alias, home)
    if _verified(target, model):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the marker
        if _verified(target, model):
            return target
        with atomic_folder(target, marker=GGUF_MARKER, what="a prepared GGUF") as work:
            progress(f"verifying {alias} parts ({model.size / 1e6:.0f} MB, sha256)")
            join_and_verify(model, work / GGUF_FILE)
            _save_tokenizer(work / GGUF_FILE, work / TOKENIZER_DIR)
            stat = (work / GGUF_FILE).stat()
            info = {"alias": alias, "sha256": model.sha256, "size": stat.st_size}
            write_json(work / GGUF_MARKER, {**info, "checked_mtime_ns": stat.st_mtime_ns})
    return target


def _verified(folder: Path, model) -> bool:
    """A prepared folder is trusted only while its GGUF still has the size and hash it was verified with."""
    marker = folder / GGUF_MARKER
    if not marker.is_file():
        return False
    info = read_json(marker)
    path = folder / GGUF_FILE
    if info.get("sha256") != model.sha256 or not path.is_file() or path.stat().st_size != model.size:
        raise RagPersonaError(
            f"{path}: the prepared GGUF no longer matches {model.alias} (size or hash changed); "
            f"delete {folder} and run again"
        )
    mtime = path.stat().st_mtime_ns
    if info.get("checked_mtime_ns") != mtime:
        # Re-hash after any change on disk (a copy, a restore): refuse tampered weights before use.
        if file_sha256(path) != model.sha256:
            raise RagPersonaError(
                f"{path}: sha256 mismatch; refusing to load tampered weights (delete {folder})"
            )
        write_json(marker, {**info, "checked_mtime_ns": mtime})
    return True


def resolve_gguf(model: str | None = None, progress=lambda msg: None) -> tuple[Path, Path]:
    """(GGUF file, tokenizer folder or GGUF file) for a bundled alias or a local .gguf path."""
    name = model or get_settings().chat_model
    if name in BUNDLED:
        folder = prepare_gguf(name, progress=progress)
        return folder / GGUF_FILE, folder / TOKENIZER_DIR
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RagPersonaError(f"model {name}: no such GGUF file")
        return path, path
    raise RagPersonaError(
        f"model {name!r}: llama.cpp runs a bundled alias ({', '.join(BUNDLED)}) or a local .gguf file; "
        "use --engine transformers for hub ids and HF folders"
    )


def gguf_lora_for(adapter: str | Path, base_gguf: Path) -> Path:
    """The adapter's GGUF LoRA: the one shipped beside it if made from these very weights by the current
    conversion, else converted once into the cache on first use."""
    adapter = Path(adapter)
    if not (adapter / "adapter_model.safetensors").is_file():
        raise RagPersonaError(f"adapter {adapter}: no adapter_model.safetensors")
    sha = weights_sha256(adapter)
    shipped = adapter / GGUF_LORA_FILE
    if shipped.is_file() and is_current(shipped, sha):
        return shipped
    name = f"{adapter.name}-{sha[:16]}-{base_gguf.parent.name}-v{FORMAT}.gguf"
    cached = get_settings().home / "gguf-lora" / name
    if not cached.is_file():
        write_gguf_lora(adapter, base_gguf, cached)
    return cached


def reply_ngram_bans(reply: np.ndarray, n: int) -> np.ndarray:
    """Tokens that would repeat an n-gram already in the reply (the reply-only no-repeat rule), vectorised."""
    if n < 2 or len(reply) < n:
        return np.empty(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(reply, n)
    match = (windows[:, :-1] == reply[len(reply) - n + 1 :]).all(axis=1)
    return np.unique(windows[match, -1])


@dataclass
class Penalties:
    """transformers' repetition penalty (over prompt and reply) and the reply-only n-gram ban, for llama.cpp."""

    prompt_len: int
    repetition_penalty: float = 1.0
    reply_no_repeat_ngram: int = 0

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.repetition_penalty != 1.0:
            ids = np.unique(input_ids)
            s = scores[ids]
            scores[ids] = np.where(s < 0, s * self.repetition_penalty, s / self.repetition_penalty)
        if self.reply_no_repeat_ngram:
            banned = reply_ngram_bans(np.asarray(input_ids[self.prompt_len :]), self.reply_no_repeat_ngram)
            scores[banned] = -np.inf
        return scores


@dataclass
class LlamaCppBackend:
    """One llama.cpp context; turns run one at a time and reuse the longest prompt prefix already in its KV cache."""

    llama: object
    tokenizer: object
    source: str
    adapter: str | None = None
    engine: str = "llama.cpp"
    info: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def eos_ids(self) -> list[int]:
        ids = [int(self.llama.token_eos())]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(int(self.tokenizer.eos_token_id))
        return ids

    def generate(self, prompt_ids: list[int], settings, cancel: threading.Event | None = None) -> Generation:
        n_ctx = self.llama.n_ctx()
        if len(prompt_ids) + settings.max_new_tokens > n_ctx:
            raise RagPersonaError(
                f"prompt: {len(prompt_ids)} tokens + {settings.max_new_tokens} new exceed the context of {n_ctx}"
            )
        eos = frozenset(self.eos_ids())
        cached = self.llama.longest_token_prefix(self.llama._input_ids.tolist(), prompt_ids)
        steps = self._steps(list(prompt_ids), settings, eos)
        return Generation.of_tokens(
            steps, self.tokenizer, prompt_ids, eos, cancel, cached_tokens=min(cached, len(prompt_ids) - 1)
        )

    def _steps(self, prompt_ids: list[int], settings, eos: frozenset[int]):
        from llama_cpp import LogitsProcessorList

        penalties = Penalties(len(prompt_ids), settings.repetition_penalty, settings.reply_no_repeat_ngram)
        sampling = (
            {"temp": settings.temperature, "top_p": settings.top_p, "top_k": 50}
            if settings.do_sample
            else {"temp": 0.0, "top_k": 1, "top_p": 1.0}
        )
        with self.lock:  # a llama.cpp context serves one sequence at a time
            if settings.seed is not None:
                self.llama.set_seed(int(settings.seed))
            tokens = self.llama.generate(
                prompt_ids,
                min_p=0.0,
                typical_p=1.0,
                repeat_penalty=1.0,  # applied by Penalties with transformers' rule instead
                logits_processor=LogitsProcessorList([penalties]),
                **sampling,
            )
            for count, token in enumerate(tokens, start=1):
                token = int(token)
                yield token, "", None
                if token in eos or count >= settings.max_new_tokens:
                    return


_PARAMS_LOCK = threading.Lock()


def _extra_buffers_ok() -> bool:
    """Whether llama.cpp may put weights in its "extra" CPU buffer types (AMX tiles, repacked layouts).

    A build with AMX kernels (the stock wheel built natively on an AMX CPU) stores the weights in AMX
    buffers, and the first batched prompt decode then crashes the process (SIGSEGV) where the kernel or
    a sandbox does not grant AMX tile state (llama-cpp-python 0.3.36, Qwen2.5 Q4_K_M; upstream
    llama.cpp#20824). Only that combination turns them off: a build without AMX (CMAKE_ARGS with
    GGML_NATIVE=OFF and the AVX-512 flags) keeps the repacked kernels (bench/results/chat_xeon_amx_builds.md).
    RAG_PERSONA_LLAMA_EXTRA_BUFFERS=1 (or 0) overrides.
    """
    env = os.environ.get("RAG_PERSONA_LLAMA_EXTRA_BUFFERS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off")
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        flags = ""
    import llama_cpp

    return extra_buffers_safe(llama_cpp.llama_print_system_info().decode(errors="replace"), flags)


def extra_buffers_safe(system_info: str, cpu_flags: str) -> bool:
    """False for an AMX build (its system info lists AMX_INT8 = 1) on a CPU with AMX tiles, and on such a
    CPU whenever the system info lists no CPU features at all (a backend not loaded yet: assume AMX)."""
    if "amx_tile" not in cpu_flags:
        return True
    return "CPU :" in system_info and "AMX_INT8 = 1" not in system_info


_LOG_CALLBACK = None


def _errors_only_log() -> None:
    """Let through only llama.cpp's error messages on stderr.

    llama-cpp-python 0.3.36 maps ggml's log levels off by one (its WARN is ggml's INFO, its ERROR ggml's
    WARN), so its own quiet setting still prints warnings such as one line per LoRA tensor that cannot
    use the repacked buffer. ggml: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous message.
    """
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    import ctypes

    import llama_cpp

    last = [0]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        level = last[0] if level == 5 else level
        last[0] = level
        if level == 4:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _LOG_CALLBACK = callback  # ctypes calls it for the process's life: keep it referenced


@contextmanager
def _model_params(**overrides):
    """llama-cpp-python's Llama() takes no argument for some model params (use_extra_bufts): set them on
    the defaults it starts from, for this load only."""
    import llama_cpp.llama_cpp as lib  # the module Llama.__init__ reads the defaults from

    with _PARAMS_LOCK:
        default = lib.llama_model_default_params

        def params():
            p = default()
            for name, value in overrides.items():
                setattr(p, name, value)
            return p

        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = default


def llama_server_command(gguf: str | Path, *args: str) -> list[str]:
    """The command line that starts llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`
    with these args) on this machine, with the same extra-buffer rule as `load_llamacpp` (see above)."""
    boot = (
        "import runpy, sys\n"
        "from rag_persona.generation.llamacpp import _extra_buffers_ok, _model_params\n"
        "sys.argv = ['llama_cpp.server', *sys.argv[1:]]\n"
        "with _model_params(use_extra_bufts=_extra_buffers_ok()):\n"
        "    runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
    )
    return [sys.executable, "-c", boot, "--model", str(gguf), *args]


def load_llamacpp(
    model: str | None = None,
    *,
    adapter: str | None = None,
    n_ctx: int = DEFAULT_N_CTX,
    n_threads: int | None = None,
    progress=lambda msg: None,
) -> LlamaCppBackend:
    """Open a GGUF (bundled alias or path) with llama.cpp, the adapter applied as a GGUF LoRA."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    _errors_only_log()
    gguf_path, tokenizer_src = resolve_gguf(model, progress=progress)
    lora = str(gguf_lora_for(adapter, gguf_path)) if adapter else None
    if tokenizer_src.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_src.parent), gguf_file=tokenizer_src.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_src))
    threads = n_threads or int(os.environ.get("RAG_PERSONA_THREADS", 0)) or os.cpu_count() or 1
    progress(f"llama.cpp: loading {gguf_path.name} ({threads} threads{', LoRA ' + lora if lora else ''})")
    try:
        with _model_params(use_extra_bufts=_extra_buffers_ok()):
            llama = Llama(
                model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, lora_path=lora, verbose=False
            )
    except ValueError as exc:
        raise RagPersonaError(f"model {gguf_path}: llama.cpp cannot load it ({exc})") from None
    return LlamaCppBackend(
        llama=llama,
        tokenizer=tokenizer,
        source=str(model or get_settings().chat_model),
        adapter=str(adapter) if adapter else None,
        info={"gguf": str(gguf_path), "lora": lora, "n_ctx": n_ctx, "threads": threads},
    )
