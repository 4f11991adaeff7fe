"""Console output (rich) and experiment tracking (Weights & Biases)."""
