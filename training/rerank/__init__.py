"""Cross-encoder reranker training: (query, passage, label) pairs and the CPU training run."""
