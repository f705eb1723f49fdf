"""clipgen: image generation from CLIP latents (unCLIP, pOps, DiffusionCLIP) in JAX."""

__version__ = "0.1.0"
