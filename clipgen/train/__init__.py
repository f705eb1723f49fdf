"""Training: one sharded loop (`loop.py`) and one file per stage with its batch and loss."""
