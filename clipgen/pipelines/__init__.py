"""clipgen.pipelines."""
