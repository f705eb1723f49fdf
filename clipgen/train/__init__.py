"""clipgen.train."""
