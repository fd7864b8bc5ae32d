"""Load a causal LM by bundled alias, hub id or local path: on CUDA or the CPU's dtype, 4-bit on request."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.generation.models import BUNDLED, prepare
from rag_persona.settings import get_settings
from rag_persona.utils.hardware import cpu_dtype, dtype_name
from rag_persona.utils.io import means_local_path


@dataclass
class LoadedModel:
    """A model with its tokenizer and a record of how it was loaded."""

    model: object
    tokenizer: object
    source: str
    device: str
    dtype: str
    quantized: bool = False
    adapter: str | None = None
    info: dict = field(default_factory=dict)


def resolve_model_path(name: str | None = None, progress=print) -> str:
    """Map a bundled alias to its converted folder (preparing it once); pass ids and paths through."""
    name = name or get_settings().chat_model
    if name in BUNDLED:
        return str(prepare(name, progress=progress))
    return name


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(device: str | None = None):
    """bf16 on CUDA; on a CPU bf16 only where it multiplies bf16 natively, else float32 (utils.hardware:
    27x faster LoRA steps on an AVX2-only CPU, bench/results/dtype.md); RAG_PERSONA_DTYPE overrides."""
    import torch

    if (device or ("cuda" if cuda_available() else "cpu")).startswith("cuda"):
        return torch.bfloat16
    return cpu_dtype()


def from_pretrained_kwargs(load_in_4bit: bool = False, device: str | None = None) -> dict:
    """`from_pretrained` arguments for every model we load: safetensors, no remote code, the device's dtype or
    4-bit NF4."""
    import torch

    kwargs: dict = {"trust_remote_code": False, "use_safetensors": True}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": 0}
    else:
        kwargs["dtype"] = compute_dtype(device)
    return kwargs


def load_causal_lm(
    name: str | None = None,
    *,
    adapter: str | None = None,
    load_in_4bit: bool = False,
    device: str | None = None,
    progress=print,
) -> LoadedModel:
    """Load weights as safetensors with trust_remote_code off; attach a peft adapter if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The adapter first: a bundled model's first open converts it (minutes), its weights load after.
    if adapter:
        if not Path(adapter).is_dir():
            raise RagPersonaError(f"adapter {adapter}: no such folder")
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise RagPersonaError(f"adapter {adapter}: not a peft adapter folder (no adapter_config.json)")
    source = resolve_model_path(name, progress=progress)
    has_cuda = cuda_available()
    device = device or ("cuda" if has_cuda else "cpu")
    if load_in_4bit and not has_cuda:
        raise RagPersonaError(f"model {source}: 4-bit loading needs CUDA (bitsandbytes); none is present")
    kwargs = from_pretrained_kwargs(load_in_4bit, device)
    is_local = Path(source).exists()
    if not is_local and means_local_path(source):
        raise RagPersonaError(f"model {source}: no such model folder")
    if not is_local and "/" not in source:
        raise RagPersonaError(
            f"model {source!r}: not a bundled alias ({', '.join(BUNDLED)}), local folder or hub id"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        # ValueError/KeyError: transformers reading a tokenizer or config file that is not one
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RagPersonaError(f"model {source}: cannot load ({type(exc).__name__}: {first})") from exc
    if not load_in_4bit:
        model.to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        device=device,
        dtype="nf4" if load_in_4bit else dtype_name(kwargs["dtype"]),
        quantized=load_in_4bit,
        adapter=adapter,
    )
