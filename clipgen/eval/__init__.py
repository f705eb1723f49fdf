"""Evaluation: retrieval, prior embeddings, FID/KID/CLIP score, and the evaluation runs."""
