"""clipgen.eval."""
