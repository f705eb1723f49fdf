"""clipgen.models."""
