"""Data: the shapes world, tokenizers, degradations and the input pipeline."""
