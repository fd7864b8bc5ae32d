"""The chat app: Gradio page + OpenAI-compatible API over one shared model (`rag-persona serve`)."""
