"""A peft LoRA adapter written as llama.cpp's GGUF LoRA (general.type "adapter"), so llama.cpp applies it at load."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.utils.io import write_file_atomic

GGUF_LORA_FILE = "adapter.gguf"
SOURCE_KEY = "rag_persona.source_sha256"  # the peft weights this file was converted from
# Bumped when the conversion changes, so a file an older version wrote (shipped or cached) is not reused.
# 2: float32 tensors (1 wrote float16, which makes llama.cpp round the activations to float16 in A·x).
FORMAT_KEY = "rag_persona.lora_format"
FORMAT = 2
_PEFT_PREFIX = "base_model.model."


def weights_sha256(adapter_dir: str | Path) -> str:
    return hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()


def _field(fields: dict, key: str):
    """A scalar GGUF header field (str or number), None when absent."""
    field = fields.get(key)
    return field.contents() if field is not None else None


def is_current(gguf_lora: str | Path, adapter_sha256: str) -> bool:
    """Whether this GGUF LoRA was converted from these peft weights by the current conversion."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_lora)).fields
    return _field(fields, SOURCE_KEY) == adapter_sha256 and _field(fields, FORMAT_KEY) == FORMAT


def gguf_metadata(path: str | Path) -> dict:
    """Architecture and block count of a GGUF model (read from its header, weights stay on disk)."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    arch = _field(fields, "general.architecture")
    return {"architecture": arch, "block_count": int(_field(fields, f"{arch}.block_count"))}


def _adapter_config(adapter_dir: Path) -> dict:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RagPersonaError(f"{adapter_dir}: not a peft adapter (no adapter_config.json)") from None
    if config.get("peft_type") != "LORA":
        raise RagPersonaError(
            f"{adapter_dir}: peft_type {config.get('peft_type')!r}; only LORA converts to GGUF"
        )
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(unsupported):
            raise RagPersonaError(
                f"{adapter_dir}: field '{unsupported}' is set; llama.cpp LoRA cannot express it"
            )
    return config


def _effective_alpha(config: dict) -> float:
    # llama.cpp scales B·A by alpha / r; rsLoRA scales by alpha / sqrt(r), the same as alpha·sqrt(r) / r.
    alpha, r = float(config["lora_alpha"]), int(config["r"])
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha


def lora_tensors(adapter_dir: Path, architecture: str, block_count: int) -> dict[str, object]:
    """GGUF tensor name → float32 numpy array, `blk.N.attn_q.weight.lora_a` style, from a peft adapter."""
    import gguf
    from safetensors import safe_open

    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise RagPersonaError(f"architecture {architecture!r}: unknown to the gguf package")
    names = gguf.get_tensor_name_map(arch, block_count)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise RagPersonaError(f"{adapter_dir}: no adapter_model.safetensors")
    out = {}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            part = "lora_a" if ".lora_A.weight" in key else "lora_b" if ".lora_B.weight" in key else None
            if part is None:
                raise RagPersonaError(f"{weights}: tensor {key!r} is not a LoRA A/B matrix")
            hf_name = key.removeprefix(_PEFT_PREFIX).replace(f".lora_{part[-1].upper()}.weight", ".weight")
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise RagPersonaError(f"{weights}: tensor {key!r} has no llama.cpp counterpart")
            # float32, not float16: ggml multiplies a float16 matrix by activations rounded to float16, and
            # that rounding alone flipped 3 of 20 greedy replies against peft (float32 12/20, float16 9/20 on
            # an AVX2 CPU; tests/test_engines.py). peft computes A·x at the model's compute precision.
            out[f"{gguf_name}.{part}"] = f.get_tensor(key).float().numpy()
    return out


def write_gguf_lora(adapter_dir: str | Path, base_gguf: str | Path, out: str | Path | None = None) -> Path:
    """Convert the adapter for the given base GGUF; written atomically beside the adapter by default."""
    import gguf

    adapter_dir = Path(adapter_dir)
    out = Path(out) if out else adapter_dir / GGUF_LORA_FILE
    config = _adapter_config(adapter_dir)
    meta = gguf_metadata(base_gguf)
    tensors = lora_tensors(adapter_dir, meta["architecture"], meta["block_count"])

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), meta["architecture"])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _effective_alpha(config))
        writer.add_string(SOURCE_KEY, weights_sha256(adapter_dir))
        writer.add_uint32(FORMAT_KEY, FORMAT)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_file_atomic(out, write)
