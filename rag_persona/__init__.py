"""rag-persona: retrieval-augmented character chatbots."""

__version__ = "0.1.0"
