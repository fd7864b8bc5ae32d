"""Training: datasets from the knowledge base, trainers, label audits, merging and analysis."""
