"""Flax linen modules only: init/apply, no training, no I/O."""
