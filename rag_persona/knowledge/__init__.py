"""Persona knowledge: facts and labelled queries on disk, validated into dataclasses."""

from rag_persona.knowledge.facts import (
    FACTS_FILE,
    Fact,
    KnowledgeBase,
    LabelledQuery,
    edit_knowledge,
    fact_files,
    knowledge_hash,
    load_knowledge,
    load_queries,
    parse_fact,
    write_facts,
)

__all__ = [
    "FACTS_FILE",
    "Fact",
    "KnowledgeBase",
    "LabelledQuery",
    "edit_knowledge",
    "fact_files",
    "knowledge_hash",
    "load_knowledge",
    "load_queries",
    "parse_fact",
    "write_facts",
]
