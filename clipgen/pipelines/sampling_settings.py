"""How the unCLIP cascade samples: each diffusion stage's respacing, sampler, guidance (and
its null), x0 clamp and (for the prior) best-of-N, by stage name, the cascade's embedding
normalisation, and the manipulations' inversion settings. The defaults are the paper's and
clipgen's own conventions; a trained cascade's stage configs bring their `sample` sections,
a public pipeline folder its own conventions (clipgen.pipelines.public).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from clipgen import stages

GUIDANCE_NULLS = ("dropped", "empty_caption")


@dataclasses.dataclass(frozen=True)
class StageSampling:
    """How one diffusion stage of the cascade samples: its respacing ("N", "ddimN", or
    "unclipN": diffusers' UnCLIPScheduler timesteps), the sampler ("ddpm" or "ddim") and
    DDIM's eta, the classifier-free guidance scale (1: none), for the prior the best-of-N
    draws, the clamp of the x0 estimate (None: the stage's own: none for the prior's
    latents, 1 for the decoder, the target range for an upsampler; inf: none), and the
    guidance's null: "dropped", the null clipgen's stages train with (the prior: a zero text
    embedding with every token masked; the decoder: the null image embedding and the text
    masked out), or "empty_caption", Karlo's and Kandinsky's (the CLIP encodings of "";
    for the decoder with the null image embedding); for an upsampler, the sigma of the
    gaussian blur applied to its low-resolution input (0: none; clipgen.sampling.
    sample_upsampler)."""

    respacing: str
    method: str = "ddpm"
    eta: float = 0.0
    guidance: float = 1.0
    best_of: int = 1
    clip: float | None = None
    guidance_null: str = "dropped"
    condition_blur: float = 0.0

    def __post_init__(self):
        if self.guidance_null not in GUIDANCE_NULLS:
            raise ValueError(f"guidance_null {self.guidance_null!r} is not one of {GUIDANCE_NULLS}")


# The paper's (Table 3): prior 64 strided steps (ancestral, without Analytic-DPM's
# variances) keeping the best of 2, decoder 250 steps, upsamplers DDIM 27 and 15 steps.
PAPER_SAMPLING = {
    "prior": StageSampling("64", best_of=2),
    "decoder": StageSampling("250"),
    "upsampler": StageSampling("ddim27", "ddim"),
    "upsampler2": StageSampling("ddim15", "ddim"),
}
# A stage config's `sample` keys -> StageSampling fields.
_SAMPLE_KEYS = {
    "respacing": "respacing",
    "method": "method",
    "eta": "eta",
    "guidance_scale": "guidance",
    "best_of": "best_of",
    "clip_denoised": "clip",
    "guidance_null": "guidance_null",
    "condition_blur": "condition_blur",
}
EMBED_NORMS = ("l2", "raw")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each stage samples (by stage name), and the manipulations' settings:
    `invert_*` and `edit_guidance` serve DDIM inversion and DDIM decoding over the
    decoder's `invert_respacing` process, both with the decoder guided by `edit_guidance`,
    so that eta = 0 decodes an inverted image back to itself. `embed_norm` is the cascade's
    convention for CLIP embeddings: "l2" (clipgen's: text and image embeddings, and the
    prior's draws, scaled to unit norm) or "raw" (Karlo's and Kandinsky's: as CLIP projects
    them and as the prior draws them).

    `generate(..., **overrides)` and `replace` take flat names: `<stage>_<field>` for a
    stage's StageSampling field (decoder_respacing="50", prior_guidance=4.0) and the
    manipulation settings as they are."""

    stages: tuple[tuple[str, StageSampling], ...] = tuple(PAPER_SAMPLING.items())
    invert_respacing: str = "ddim50"
    invert_iterations: int = 2
    edit_guidance: float = 1.0
    embed_norm: str = "l2"

    def __post_init__(self):
        if self.embed_norm not in EMBED_NORMS:
            raise ValueError(f"embed_norm {self.embed_norm!r} is not one of {EMBED_NORMS}")

    def __getitem__(self, stage: str) -> StageSampling:
        for name, settings in self.stages:
            if name == stage:
                return settings
        raise KeyError(f"no sampling settings for stage {stage!r}")

    @classmethod
    def from_configs(cls, configs: Mapping[str, ml_collections.ConfigDict]) -> Sampling:
        """The `sample` sections of the diffusion stages' configs (by stage name); the
        paper's settings for what they leave out."""
        settings = []
        for spec in stages.cascade():
            if spec.role == "clip" or (spec.name not in configs | PAPER_SAMPLING.keys()):
                continue
            sample = configs[spec.name].get("sample") if spec.name in configs else None
            values = {
                field: sample[key]
                for key, field in _SAMPLE_KEYS.items()
                if sample is not None and key in sample
            }
            default = PAPER_SAMPLING.get(spec.name, StageSampling("50"))
            settings.append((spec.name, dataclasses.replace(default, **values)))
        return cls(tuple(settings))

    def replace(self, **overrides) -> Sampling:
        """These settings with `overrides` (flat names, see the class); None values are
        ignored."""
        top = {f.name for f in dataclasses.fields(self)} - {"stages"}
        stage_fields = {f.name for f in dataclasses.fields(StageSampling)}
        per_stage: dict[str, dict[str, Any]] = {name: {} for name, _ in self.stages}
        replaced, unknown = {}, []
        for key, value in overrides.items():
            if value is None:
                continue
            if key in top:
                replaced[key] = value
                continue
            name, field = _split_stage_key(key, per_stage, stage_fields)
            if name:
                per_stage[name][field] = value
            else:
                unknown.append(key)
        if unknown:
            known = sorted(top) + [f"{n}_{f}" for n in per_stage for f in sorted(stage_fields)]
            raise ValueError(f"unknown sampling settings {sorted(unknown)}; known: {known}")
        settings = tuple(
            (name, dataclasses.replace(stage, **per_stage[name])) for name, stage in self.stages
        )
        return dataclasses.replace(self, stages=settings, **replaced)


def _split_stage_key(key: str, names, fields) -> tuple[str, str]:
    """`<stage>_<field>` -> (stage, field); ("", "") when no stage and field make `key`."""
    for name in names:
        field = key.removeprefix(name + "_")
        if field != key and field in fields:
            return name, field
    return "", ""
