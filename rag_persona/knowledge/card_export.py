"""Persona folder → SillyTavern chara_card_v3 card: JSON, or a placeholder PNG with the card in its chunks.

See rag_persona.knowledge.cards' module docstring for what goes where and what a card cannot carry.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.card_text import (
    CARD_ONLY_FIELDS,
    DIALOGUES_FILE,
    EXPORT_DIALOGUES,
    EXTENSION_KEY,
    EXTRAS_FILE,
    MAX_BOOK_ENTRIES,
    MAX_CARD_BYTES,
    PERSONA_FILE,
    V1_FIELDS,
    dedupe,
)
from rag_persona.knowledge.facts import FACTS_FILE, Fact, parse_fact
from rag_persona.utils.io import read_json, read_jsonl, write_file_atomic

_V2_DATA = (
    *V1_FIELDS,
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "alternate_greetings",
    "character_book",
    "tags",
    "creator",
    "character_version",
    "extensions",
)


@dataclass
class CardExport:
    """What `persona_to_card` wrote."""

    path: Path
    name: str
    entries: int
    constant: int
    dialogues: int

    def summary(self) -> str:
        kind = "PNG" if self.path.suffix.lower() == ".png" else "JSON"
        return (
            f"wrote chara_card_v3 {kind} card for {self.name} to {self.path}: "
            f"{self.entries} lorebook entries ({self.constant} constant), {self.dialogues} example dialogues"
        )


def _persona_facts(path: Path) -> list[Fact]:
    if not path.exists():
        return []
    facts, seen = [], set()
    for line, obj in read_jsonl(path):
        fact = parse_fact(path, line, obj)
        if fact.id in seen:
            raise RagPersonaError(f"{path}:{line}: field 'id': duplicate id {fact.id!r}")
        seen.add(fact.id)
        facts.append(fact)
    return facts


def _persona_dialogues(path: Path) -> list[list[tuple[str, str]]]:
    """(user, in-register answer) turns of each conversation in dialogues.jsonl ([] when there is none)."""
    if not path.exists():
        return []
    out = []
    for line, obj in read_jsonl(path):
        turns = obj.get("turns")
        if not isinstance(turns, list) or not turns:
            raise RagPersonaError(f"{path}:{line}: field 'turns': must be a non-empty list")
        pairs = []
        for i, turn in enumerate(turns):
            styled = "ojousama" if isinstance(turn, dict) and "ojousama" in turn else "styled"
            for key in ("user", styled):
                if not isinstance(turn, dict) or not isinstance(turn.get(key), str) or not turn[key].strip():
                    raise RagPersonaError(f"{path}:{line}: field 'turns[{i}].{key}': missing or empty")
            pairs.append((turn["user"].strip(), turn[styled].strip()))
        out.append(pairs)
    return out


def build_mes_example(conversations: list[list[tuple[str, str]]], examples: Iterable[str]) -> str:
    """<START> blocks: the first EXPORT_DIALOGUES conversations, then each example not answered in them."""
    blocks, said = [], set()
    for turns in conversations[:EXPORT_DIALOGUES]:
        blocks.append("\n".join(["<START>", *(f"{{{{user}}}}: {u}\n{{{{char}}}}: {s}" for u, s in turns)]))
        said.update(s for _, s in turns)
    blocks += [f"<START>\n{{{{char}}}}: {x}" for x in examples if x not in said]
    return "\n".join(blocks)


# What _book_entry writes for the fields a fact does not carry: an imported entry's value is kept in
# EXTRAS_FILE only where it differs (so a persona folder → card → folder round trip adds no extras).
ENTRY_DEFAULTS = {
    "secondary_keys": [],
    "case_sensitive": False,
    "use_regex": False,
    "selective": False,
    "priority": 10,
    "position": "before_char",
}
EXPORT_NOTE = "Exported by rag-persona from the persona folder"


def _book_entry(i: int, fact: Fact) -> dict:
    keywords = fact.extra.get("keywords")
    keywords = [k for k in keywords if isinstance(k, str)] if isinstance(keywords, list) else []
    ours = {k: v for k, v in (("questions", fact.questions), ("tags", fact.tags)) if v}
    return {
        "keys": dedupe([*keywords, *fact.questions]),
        "secondary_keys": [],
        "content": fact.text,
        "extensions": {EXTENSION_KEY: ours} if ours else {},
        "enabled": True,
        "insertion_order": i,
        "constant": fact.extra.get("constant") is True,
        "name": fact.id,
        "comment": fact.id,
        "id": i,
        **ENTRY_DEFAULTS,
    }


def _with_extras(entry: dict, extra: dict | None) -> dict:
    """A lorebook entry with the fields its card had beyond what the fact carries (EXTRAS_FILE)."""
    if not extra:
        return entry
    ours = entry["extensions"]
    return {**entry, **extra, "extensions": {**extra.get("extensions", {}), **ours}}


def _read_extras(path: Path) -> dict:
    """EXTRAS_FILE of a persona folder imported from a card ({} when there is none)."""
    if not path.exists():
        return {}
    extras = read_json(path)
    for key in ("extensions", "character_book", "entries"):
        if not isinstance(extras.get(key, {}), dict):
            raise RagPersonaError(f"{path}: field '{key}': expected an object")
    if not all(isinstance(v, dict) for v in extras.get("entries", {}).values()):
        raise RagPersonaError(f"{path}: field 'entries': expected an object of entry objects")
    skipped = extras.get("skipped_entries", [])
    if not isinstance(skipped, list) or not all(isinstance(e, dict) for e in skipped):
        raise RagPersonaError(f"{path}: field 'skipped_entries': expected a list of entry objects")
    return extras


def build_card(
    persona: dict,
    facts: list[Fact],
    conversations: list[list[tuple[str, str]]],
    extras: dict | None = None,
) -> dict:
    """The chara_card_v3 object for a persona.json object, its facts and its dialogues' turns, with what
    the imported card had beyond them (`extras`, EXTRAS_FILE) laid back in."""
    extras = extras or {}
    style = persona.get("style") or {}
    # What a card has no field for; the instruction has one (system_prompt), so it is not repeated here.
    ours = {
        "id": persona["id"],
        "reading": persona.get("reading"),
        "reply_length": persona.get("reply_length"),
    }
    ours = {k: v for k, v in ours.items() if v}
    if "style" in persona:
        ours["style"] = {k: v for k, v in style.items() if k != "instruction"}
    data = {
        "name": persona["name"],
        "description": persona["summary"],
        "personality": "",
        "scenario": "",
        "first_mes": persona.get("greeting") or "",
        "mes_example": build_mes_example(conversations, style.get("examples") or []),
        "creator_notes": f"{EXPORT_NOTE} '{persona['id']}'.",
        "system_prompt": style.get("instruction") or "",
        "post_history_instructions": "",
        "alternate_greetings": [],
        "group_only_greetings": [],
        "tags": [],
        "creator": "",
        "character_version": "",
        "extensions": {EXTENSION_KEY: ours},
        "character_book": {
            "name": persona["name"],
            "extensions": {},
            "entries": [
                _with_extras(_book_entry(i, f), extras.get("entries", {}).get(f.id))
                for i, f in enumerate(facts)
            ],
        },
    }
    data.update({k: v for k, v in extras.items() if k in CARD_ONLY_FIELDS})
    data["extensions"] = {**extras.get("extensions", {}), EXTENSION_KEY: ours}
    book = data["character_book"]
    book.update({k: v for k, v in extras.get("character_book", {}).items() if k != "entries"})
    # Disabled and empty entries go back as the card had them, after the facts' entries and numbered on.
    for e in extras.get("skipped_entries", []):
        book["entries"].append({**e, "id": len(book["entries"])})
    return {"spec": "chara_card_v3", "spec_version": "3.0", **{k: data[k] for k in V1_FIELDS}, "data": data}


def _v2(card: dict) -> dict:
    data = {k: card["data"][k] for k in _V2_DATA}
    return {"spec": "chara_card_v2", "spec_version": "2.0", **{k: data[k] for k in V1_FIELDS}, "data": data}


def _png(card: dict) -> bytes:
    """A small placeholder portrait (colour from the name) with the card in ccv3 and chara chunks."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    digest = hashlib.sha256(card["data"]["name"].encode("utf-8")).digest()
    back, front = tuple(64 + b // 2 for b in digest[:3]), tuple(160 + b // 3 for b in digest[3:6])
    img = Image.new("RGB", (256, 320), back)
    draw = ImageDraw.Draw(img)
    draw.ellipse((78, 48, 178, 148), fill=front)
    draw.rounded_rectangle((48, 168, 208, 320), radius=48, fill=front)
    info = PngInfo()
    for key, obj in (("chara", _v2(card)), ("ccv3", card)):
        info.add_text(
            key, base64.b64encode(json.dumps(obj, ensure_ascii=False).encode("utf-8")).decode("ascii")
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def persona_to_card(persona_dir: str | Path, out_path: str | Path) -> CardExport:
    """Write a persona folder as a chara_card_v3 card: JSON or PNG by out_path's suffix (atomically)."""
    persona_dir, out = Path(persona_dir), Path(out_path)
    if out.suffix.lower() not in (".json", ".png"):
        raise RagPersonaError(f"{out}: a card file name ends in .json or .png")
    if out.is_dir():
        raise RagPersonaError(f"{out}: is a folder; name the card file to write")
    persona = read_json(persona_dir / PERSONA_FILE)
    for key in ("id", "name", "summary"):
        if not isinstance(persona.get(key), str) or not persona[key].strip():
            raise RagPersonaError(f"{persona_dir / PERSONA_FILE}: field '{key}': missing or empty")
    if not isinstance(persona.get("style") or {}, dict):
        raise RagPersonaError(f"{persona_dir / PERSONA_FILE}: field 'style': expected an object")
    facts = _persona_facts(persona_dir / FACTS_FILE)
    extras = _read_extras(persona_dir / EXTRAS_FILE)
    entries = len(facts) + len(extras.get("skipped_entries", []))
    if entries > MAX_BOOK_ENTRIES:  # the import's limit: a card we write must read back
        raise RagPersonaError(
            f"{persona_dir / FACTS_FILE}: {len(facts)} facts (+ {entries - len(facts)} skipped entries kept "
            f"in {EXTRAS_FILE}), a card's lorebook holds at most {MAX_BOOK_ENTRIES} (MAX_BOOK_ENTRIES)"
        )
    conversations = _persona_dialogues(persona_dir / DIALOGUES_FILE)
    card = build_card(persona, facts, conversations, extras)
    if out.suffix.lower() == ".png":
        payload = _png(card)
    else:
        payload = (json.dumps(card, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    if len(payload) > MAX_CARD_BYTES:
        raise RagPersonaError(
            f"{out}: the card would be {len(payload)} bytes, over MAX_CARD_BYTES ({MAX_CARD_BYTES})"
        )
    write_file_atomic(out, lambda tmp: tmp.write_bytes(payload))
    return CardExport(
        out,
        persona["name"],
        len(facts),
        sum(1 for f in facts if f.extra.get("constant") is True),
        min(len(conversations), EXPORT_DIALOGUES),
    )
