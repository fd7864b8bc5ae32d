"""Training: recipes, datasets from the knowledge base, training stages, label audits, merging, analysis."""
