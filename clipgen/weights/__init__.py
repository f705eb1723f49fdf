"""clipgen.weights."""
