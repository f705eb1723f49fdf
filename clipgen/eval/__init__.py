"""Evaluation: retrieval, and (to come) FID, KID, CLIP score and oracle metrics."""
