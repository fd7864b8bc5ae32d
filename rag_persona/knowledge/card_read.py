"""Reading SillyTavern character cards (V1 flat, V2/V3 under "data"; JSON files or PNGs with a chara/ccv3
text chunk) into a validated Card: every problem is one RagPersonaError line naming the file, chunk and field."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.card_text import MAX_BOOK_ENTRIES, MAX_CARD_BYTES, V1_FIELDS
from rag_persona.utils.text import unicode_problem

SPECS = ("chara_card_v2", "chara_card_v3")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TEXTS = (*V1_FIELDS, "system_prompt", "nickname")


@dataclass(frozen=True)
class BookEntry:
    """One character_book entry as the card has it (texts not yet macro-resolved)."""

    index: int
    keys: tuple[str, ...] = ()
    secondary_keys: tuple[str, ...] = ()
    content: str = ""
    enabled: bool = True
    constant: bool = False
    selective: bool = (
        False  # secondary_keys then filter (AND / NOT) what the keys find, not find by themselves
    )
    name: str = ""
    comment: str = ""
    id: str = ""
    extensions: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the entry as the card has it

    @property
    def label(self) -> str:
        title = self.name or self.comment
        return f"entries[{self.index}]" + (f" ({title!r})" if title else "")


@dataclass
class Card:
    """A validated character card; `source` names the file (and the PNG chunk) for messages."""

    spec: str  # chara_card_v1 | chara_card_v2 | chara_card_v3
    name: str
    path: Path
    source: str
    field_prefix: str = ""  # "data." for V2/V3: where the fields sit, for messages
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    nickname: str = ""
    entries: list[BookEntry] = field(default_factory=list)
    extensions: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)  # the card's data object (V1: the card itself)


def field_error(where: str, name: str, problem: str) -> RagPersonaError:
    return RagPersonaError(f"{where}: field '{name}': {problem}")


def _text(obj: dict, key: str, where: str, prefix: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise field_error(where, prefix + key, f"expected a string, got {type(value).__name__}")
    problem = unicode_problem(value)
    if problem:
        raise field_error(where, prefix + key, problem)
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _keys(obj: dict, key: str, where: str, prefix: str) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if isinstance(value, str):  # CCv3 allows secondary_keys as one comma-separated string
        value = value.split(",")
    if not isinstance(value, list):
        raise field_error(where, prefix + key, f"expected a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise field_error(where, f"{prefix}{key}[{i}]", f"expected a string, got {type(item).__name__}")
        if unicode_problem(item):
            raise field_error(where, f"{prefix}{key}[{i}]", unicode_problem(item))
    return tuple(k.strip() for k in value if k.strip())


def _flag(obj: dict, key: str, default: bool, where: str, prefix: str) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise field_error(where, prefix + key, f"expected true or false, got {type(value).__name__}")
    return value


def _entry(raw, index: int, where: str, prefix: str) -> BookEntry:
    fld = f"{prefix}character_book.entries[{index}]"
    if not isinstance(raw, dict):
        raise field_error(where, fld, f"expected an object, got {type(raw).__name__}")
    fld += "."
    ident = raw.get("id")
    ext = raw.get("extensions")
    return BookEntry(
        index=index,
        keys=_keys(raw, "keys", where, fld),
        secondary_keys=_keys(raw, "secondary_keys", where, fld),
        content=_text(raw, "content", where, fld),
        enabled=_flag(raw, "enabled", True, where, fld),
        constant=_flag(raw, "constant", False, where, fld),
        selective=_flag(raw, "selective", False, where, fld),
        # name and comment only label the entry (ids, messages): a non-string one is ignored, not refused.
        name=_text(raw, "name", where, fld).strip() if isinstance(raw.get("name"), str) else "",
        comment=_text(raw, "comment", where, fld).strip() if isinstance(raw.get("comment"), str) else "",
        id="" if ident is None or isinstance(ident, bool) else str(ident),
        extensions=ext if isinstance(ext, dict) else {},
        raw=raw,
    )


def _entries(book, where: str, prefix: str) -> list[BookEntry]:
    if book is None:
        return []
    if not isinstance(book, dict):
        raise field_error(where, prefix + "character_book", f"expected an object, got {type(book).__name__}")
    raw = book.get("entries")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise field_error(
            where, prefix + "character_book.entries", f"expected a list, got {type(raw).__name__}"
        )
    if len(raw) > MAX_BOOK_ENTRIES:
        raise RagPersonaError(
            f"{where}: lorebook has {len(raw)} entries, the limit is {MAX_BOOK_ENTRIES} (MAX_BOOK_ENTRIES)"
        )
    return [_entry(e, i, where, prefix) for i, e in enumerate(raw)]


def parse_card(obj, path: Path, where: str | None = None) -> Card:
    """Validate a card's JSON object (V1 flat, or V2/V3 with its fields under "data")."""
    where = where or str(path)
    if not isinstance(obj, dict):
        raise RagPersonaError(
            f"{where}: not a character card (expected a JSON object, got {type(obj).__name__})"
        )
    spec = obj.get("spec")
    if spec is None:
        if "name" not in obj:
            raise RagPersonaError(
                f"{where}: not a character card (no 'spec' and no V1 field 'name'; V1 fields: "
                f"{', '.join(V1_FIELDS)})"
            )
        data, prefix, spec = obj, "", "chara_card_v1"
    elif spec in SPECS:
        data, prefix = obj.get("data"), "data."
        if not isinstance(data, dict):
            raise field_error(where, "data", f"expected an object ({spec} keeps the card under 'data')")
    else:
        raise RagPersonaError(
            f"{where}: unknown card spec {spec!r} (known: {', '.join(SPECS)}, or a V1 card without 'spec')"
        )
    texts = {k: _text(data, k, where, prefix) for k in _TEXTS}
    texts["name"] = texts["name"].strip()
    if not texts["name"]:
        raise field_error(where, prefix + "name", "empty; a card needs the character's name")
    ext = data.get("extensions")
    if ext is not None and not isinstance(ext, dict):
        raise field_error(where, prefix + "extensions", f"expected an object, got {type(ext).__name__}")
    entries = _entries(data.get("character_book"), where, prefix)
    return Card(
        spec,
        path=path,
        source=where,
        field_prefix=prefix,
        entries=entries,
        extensions=ext or {},
        raw=data,
        **texts,
    )


def _png_card(path: Path, raw: bytes) -> tuple[object, str]:
    """The card JSON in a PNG's ccv3 (preferred) or chara text chunk, base64-decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            chunks = dict(img.text)  # reading .text loads the image: text chunks may follow the pixels
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        why = (
            "Pillow cannot identify it" if isinstance(exc, UnidentifiedImageError) else str(exc) or repr(exc)
        )
        raise RagPersonaError(f"{path}: not a readable PNG image ({why.splitlines()[0]})") from None
    # SillyTavern matches chunk names in any case and decodes base64 with or without padding and line breaks.
    named = {k.lower(): v for k, v in chunks.items() if isinstance(v, str)}
    keys = [k for k in ("ccv3", "chara") if k in named]
    if not keys:
        raise RagPersonaError(f"{path}: PNG holds no character card (no 'chara' or 'ccv3' text chunk)")
    for key in keys:
        try:
            return _chunk_json(named[key], f"{path} (PNG chunk '{key}')")
        except RagPersonaError:
            if key == keys[-1]:
                raise
    raise AssertionError("unreachable")  # the loop returns or raises


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


def _chunk_json(text: str, where: str) -> tuple[object, str]:
    """A PNG text chunk's base64 card JSON (a broken ccv3 chunk falls back to chara, as a V2 reader would)."""
    compact = re.sub(r"\s+", "", text)
    try:
        payload = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RagPersonaError(f"{where}: broken base64 ({exc})") from None
    try:
        return json.loads(payload.decode("utf-8")), where
    except UnicodeDecodeError as exc:
        raise RagPersonaError(f"{where}: broken JSON (not UTF-8 at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RagPersonaError(f"{where}: broken JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:  # a number over Python's digit limit, nesting too deep
        raise RagPersonaError(f"{where}: broken JSON ({_first_line(exc)})") from None


def load_card(path: str | Path) -> Card:
    """A character card from a .json file or a PNG with a chara/ccv3 chunk; one-line errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise RagPersonaError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    size = path.stat().st_size
    if size > MAX_CARD_BYTES:
        raise RagPersonaError(
            f"{path}: {size} bytes, the limit for a card file is {MAX_CARD_BYTES} (MAX_CARD_BYTES)"
        )
    raw = path.read_bytes()
    if raw.startswith(PNG_MAGIC):
        obj, where = _png_card(path, raw)
        return parse_card(obj, path, where)
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise RagPersonaError(f"{path}: not a character card: neither a PNG nor JSON ({reason})") from None
    except (ValueError, RecursionError) as exc:  # a number over Python's digit limit, nesting too deep
        raise RagPersonaError(f"{path}: not a character card: broken JSON ({_first_line(exc)})") from None
    return parse_card(obj, path)
