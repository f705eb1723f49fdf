"""Noise schedules and timestep respacing.

Betas are computed in float64 numpy, as improved-diffusion does; the Gaussian process in
`gaussian.py` derives every coefficient from them before casting to float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SCHEDULES = ("cosine", "linear")


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule (Nichol & Dhariwal 2021; diffusers' `squaredcos_cap_v2`)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule, 1e-4 to 2e-2 at 1000 steps, rescaled for other lengths."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def make_betas(name: str, num_timesteps: int) -> np.ndarray:
    """The named schedule's betas; `name` is one of `SCHEDULES`."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    if name == "cosine":
        return cosine_betas(num_timesteps)
    if name == "linear":
        return linear_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")


def space_timesteps(num_timesteps: int, spacing: str | int | Sequence[int]) -> list[int]:
    """The timesteps of the original process kept when respacing, sorted ascending.

    `spacing` follows improved-diffusion's `space_timesteps`: "ddimN" takes every k-th step
    from 0 with the stride k that gives exactly N steps; otherwise a comma-separated list of
    counts splits [0, T) into equal sections and takes that many evenly spaced steps from
    each (a single "N" or an int N spreads N steps over the whole process, both ends kept).
    "unclipN" takes diffusers' `UnCLIPScheduler` steps, round(i (T - 1) / (N - 1)) for
    i < N (numpy's rounding, half to even), which "N" misses for some N (21 of 1000 steps).
    A list or tuple of ints names the kept steps themselves (e.g. `uniform_grid`).
    """
    if isinstance(spacing, (list, tuple, np.ndarray)):
        kept = sorted({int(t) for t in spacing})
        if not kept or kept[0] < 0 or kept[-1] >= num_timesteps:
            raise ValueError(f"kept timesteps {list(spacing)} are not within [0, {num_timesteps})")
        return kept
    spacing = str(spacing).strip()
    if spacing.startswith("unclip"):
        wanted = int(spacing[len("unclip") :])
        if not 1 <= wanted <= num_timesteps:
            raise ValueError(f"cannot take {wanted} UnCLIP steps from {num_timesteps}")
        ratio = (num_timesteps - 1) / (wanted - 1) if wanted > 1 else 0.0
        return sorted({int(t) for t in np.round(np.arange(wanted) * ratio)})
    if spacing.startswith("ddim"):
        wanted = int(spacing[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {wanted} strided steps from {num_timesteps}")
    try:
        section_counts = [int(part) for part in spacing.split(",")]
    except ValueError:
        raise ValueError(
            f"bad timestep spacing {spacing!r}: expected 'ddimN', 'unclipN', 'N' or 'N1,N2,...'"
        ) from None
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    kept: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size or count < 1:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        frac_stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += frac_stride
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, kept: list[int]) -> np.ndarray:
    """Betas of the process that visits only `kept` steps, with the same alpha-bar at each.

    beta'_i = 1 - alpha_bar[kept_i] / alpha_bar[kept_{i-1}], so that q(x_t | x_0) is
    unchanged at every kept step (improved-diffusion's `SpacedDiffusion`).
    """
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas = []
    last = 1.0
    for t in kept:
        new_betas.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.asarray(new_betas, dtype=np.float64)


def uniform_grid(t0: int, steps: int) -> list[int]:
    """DiffusionCLIP's time grid: `steps` points from 0 to t0, int(linspace(0, 1, steps) * t0)
    (truncated, as its code does), for inverting to t0 and generating back from there."""
    if steps < 2:
        raise ValueError(f"a grid to t0 needs at least 2 steps, got {steps}")
    grid = [int(s) for s in np.linspace(0.0, 1.0, steps) * t0]
    if len(set(grid)) != steps:
        raise ValueError(f"{steps} steps to t0={t0} repeat timesteps; take at most {t0 + 1}")
    return grid
