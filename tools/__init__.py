"""Command-line tools for using a trained model (features, search, zero-shot, export)."""
