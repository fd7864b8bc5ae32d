"""Training data: build-data's SFT/DPO files, token-level labels, dialogues, CPT documents, fact answers."""
