"""Continued pre-training data: the persona's knowledge as prose documents, packed into EOS-separated blocks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from rag_persona.errors import RagPersonaError
from rag_persona.knowledge.facts import Fact, load_knowledge
from rag_persona.prompts import Persona
from training.provenance import file_sha256

from .labels import SFTExample, Tokenized, audit_labels, require_clean

FORMATS = ("prose", "qa")
BACKGROUND_GLOBS = ("background*.md", "background*.txt", "*.txt")
# Paragraph openings that name the persona: facts such as 「身長は158センチメートル。」 have no subject of
# their own, and a heading ties them to her. Several are rotated so no single string carries the knowledge.
PROSE_HEADINGS = (
    "{name}について。",
    "{name}（{reading}）のこと。",
    "お嬢様、{name}の話。",
    "{name}という少女について。",
)
QA_HEADINGS = ("{name}への質問と答え。", "{name}について聞かれたこと。")
_END = "。．.！!？?」』）)"


@dataclass
class Document:
    """One training document: where it came from and its text (the EOS id follows it in the stream)."""

    source: str
    text: str


@dataclass
class CptData:
    """Packed blocks for training and held-out evaluation, with what went into them."""

    train: Tokenized
    eval: Tokenized | None
    documents: int
    tokens: int
    dropped_tail_tokens: int
    files: list[Path] = field(default_factory=list)
    audit_checked: int = 0

    def manifest(self) -> dict:
        return {
            "files": [{"file": str(p), "sha256": file_sha256(p)} for p in self.files],
            "documents": self.documents,
            "tokens": self.tokens,
            "dropped_tail_tokens": self.dropped_tail_tokens,
            "train_blocks": len(self.train.examples),
            "eval_blocks": len(self.eval.examples) if self.eval else 0,
            "label_audit": {"checked": self.audit_checked, "failed": 0},
        }


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(tuple(_END)) else f"{text}。"


def background_files(folder: Path) -> list[Path]:
    """Longer texts about the persona next to its facts (background*.md, background*.txt, *.txt)."""
    found = {p for pattern in BACKGROUND_GLOBS for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def background_documents(path: Path) -> list[Document]:
    """Paragraphs (blank-line separated) of one text file; a markdown heading joins the paragraph below it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RagPersonaError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    docs: list[Document] = []
    heading = ""
    line = 1
    for block in text.split("\n\n"):
        start = line
        line += block.count("\n") + 2
        body = block.strip()
        if not body:
            continue
        if all(row.lstrip().startswith("#") for row in body.splitlines()):
            heading = f"{heading}\n{body}".strip()
            continue
        docs.append(Document(f"{path}:{start}", f"{heading}\n{body}".strip() if heading else body))
        heading = ""
    if heading:
        docs.append(Document(f"{path}:{line}", heading))
    return docs


def render_documents(
    facts: list[Fact],
    persona: Persona,
    *,
    variant: int,
    seed: int = 0,
    formats: tuple[str, ...] | list[str] = FORMATS,
    facts_per_paragraph: int = 4,
    background: list[Document] | None = None,
) -> list[Document]:
    """One rendering of the knowledge: facts grouped by their first tag into short paragraphs.

    Each variant shuffles the facts inside their topics, cuts the paragraphs at different points and picks
    other headings, so a fact is seen next to different neighbours. "qa" documents put each fact after one
    of its own questions, the form in which it will be asked for.
    """
    rng = random.Random(f"{seed}|cpt|{variant}")
    groups: dict[str, list[Fact]] = {}
    for fact in facts:
        groups.setdefault(fact.tags[0] if fact.tags else "other", []).append(fact)
    name = {"name": persona.name, "reading": persona.reading}
    docs = [
        Document(f"persona#v{variant}", f"{persona.name}（{persona.reading}）。{_sentence(persona.summary)}")
    ]
    for tag, members in groups.items():
        members = members[:]
        rng.shuffle(members)
        size = max(1, facts_per_paragraph + rng.choice((-1, 0, 0, 1)))
        for i in range(0, len(members), size):
            chunk = members[i : i + size]
            where = f"facts:{tag}:{','.join(f.id for f in chunk)}#v{variant}"
            if "prose" in formats:
                heading = rng.choice(PROSE_HEADINGS).format(**name)
                docs.append(Document(where, heading + "".join(_sentence(f.text) for f in chunk)))
            asked = [f for f in chunk if f.questions]
            if "qa" in formats and asked:
                heading = rng.choice(QA_HEADINGS).format(**name)
                lines = [f"問：{rng.choice(f.questions)}\n答：{_sentence(f.text)}" for f in asked]
                docs.append(Document(f"qa:{where}", heading + "\n" + "\n".join(lines)))
    docs += background or []
    rng.shuffle(docs)
    return docs


def encode_document(tokenizer, doc: Document, eos_id: int) -> list[int]:
    """Text as ordinary pieces (special-token text stays literal, the audit then refuses it) + the EOS id."""
    ids = tokenizer(doc.text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [int(i) for i in ids] + [int(eos_id)]


def pack(documents: list[list[int]], block_size: int) -> tuple[list[list[int]], int]:
    """Concatenate EOS-terminated documents and cut the stream into equal blocks; returns (blocks, dropped).

    The tail shorter than a block is dropped rather than padded, so every position of every block is a
    real token with a label.
    """
    stream = [t for doc in documents for t in doc]
    n = len(stream) // block_size
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n)]
    return blocks, len(stream) - n * block_size


def build_cpt_data(
    tokenizer,
    eos_id: int,
    eos_ids: set[int],
    *,
    knowledge_dir: str | Path,
    block_size: int = 256,
    variants: int = 8,
    eval_variants: int = 1,
    formats: tuple[str, ...] | list[str] = FORMATS,
    facts_per_paragraph: int = 4,
    seed: int = 0,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
) -> CptData:
    """Render `variants` (+ `eval_variants` held-out) copies of the knowledge, audit every document, pack.

    Labels are the input ids themselves: every token is trained, the EOS id between documents included.
    Each document is audited like an SFT completion (it ends in the EOS id; no special-token text hides in
    ordinary pieces) before packing.
    """
    folder = Path(knowledge_dir)
    if not folder.is_dir():
        raise RagPersonaError(f"{folder}: knowledge folder not found")
    kb = load_knowledge(folder)
    if not len(kb):
        raise RagPersonaError(f"{folder}: no facts to train on")
    persona = Persona.load(folder)
    files = [*kb.files, folder / "persona.json"]
    background = []
    for path in background_files(folder):
        background += background_documents(path)
        files.append(path)

    def packed(variant_ids: range, limit: int | None, split: str):
        docs = []
        for v in variant_ids:
            docs += render_documents(
                kb.facts,
                persona,
                variant=v,
                seed=seed,
                formats=formats,
                facts_per_paragraph=facts_per_paragraph,
                background=background,
            )
        ids = [encode_document(tokenizer, d, eos_id) for d in docs]
        audit = [
            audit_labels(tokenizer, doc_ids, eos_ids, source=d.source, part="text")
            for d, doc_ids in zip(docs, ids, strict=True)
        ]
        require_clean(audit, f"CPT {split}")
        blocks, dropped = pack(ids, block_size)
        if limit is not None:
            blocks = blocks[:limit]
        data = Tokenized(
            kind="cpt",
            examples=[SFTExample(list(b), list(b)) for b in blocks],
            sources=[f"{split} block {i}" for i in range(len(blocks))],
        )
        return data, len(docs), sum(len(i) for i in ids), dropped, len(audit)

    train, n_docs, n_tokens, dropped, checked = packed(range(variants), max_train_blocks, "train")
    if not train.examples:
        raise RagPersonaError(
            f"{folder}: {n_tokens} tokens of knowledge do not fill one block of {block_size}; "
            "lower cpt.block_size or raise cpt.variants"
        )
    evald = None
    if eval_variants:
        # Renderings with seeds no training variant uses: the same facts in new orders and paragraphs.
        evald, e_docs, e_tokens, _, e_checked = packed(
            range(variants, variants + eval_variants), max_eval_blocks, "eval"
        )
        checked += e_checked
    return CptData(
        train=train,
        eval=evald if evald and evald.examples else None,
        documents=n_docs,
        tokens=n_tokens,
        dropped_tail_tokens=dropped,
        files=files,
        audit_checked=checked,
    )
