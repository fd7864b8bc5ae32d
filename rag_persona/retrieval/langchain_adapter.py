"""Our retriever as a LangChain `BaseRetriever`: thresholded Documents with id and score in their metadata."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict


class PersonaLangChainRetriever(BaseRetriever):
    """LangChain adapter: `invoke(query)` returns thresholded Documents, best first."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    retriever: Any

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [
            Document(
                page_content=h.text,
                metadata={"id": h.fact_id, "score": h.score, "cosine": h.cosine, "lexical": h.lexical},
            )
            for h in self.retriever.search(query)
        ]
