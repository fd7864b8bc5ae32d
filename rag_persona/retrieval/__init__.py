"""Retrieval: embedders, the fact store and index, dense/lexical/hybrid ranking, thresholds and tuning."""
