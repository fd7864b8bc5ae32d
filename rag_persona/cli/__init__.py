"""The `rag-persona` command line."""
