"""Merging trained weights: LoRA and model merges, evolutionary merge search, task-vector analysis."""
