"""Gaussian diffusion maths as pure functions over arrays; a model is a function."""
