"""The one table of clipgen's stages: each stage's run directory, config file, trainer, place
in the unCLIP cascade and seed salt. `clipgen train`, the CLI's cascade commands, the demo
and the pipelines read it; a new stage is its config file, its trainer and one row here.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from clipgen import config as config_lib

ROLES = ("clip", "prior", "decoder", "upsampler")  # the cascade's slots, in order


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """A stage's part of `clipgen demo` on a 2-core CPU: its share of the training budget,
    and its `demo` preset's training speed and the minutes it spends not training
    (compiling, its own evaluation; for the prior also embedding the splits), as measured,
    which turn minutes into steps."""

    share: float
    steps_per_minute: float
    setup_minutes: float


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage.

    name: its run directory under a cascade's workdir, and its name in reports.
    config_file: `configs/<config_file>.py`; `preset_prefix` picks its presets there (the
        second upsampler's are `second_<preset>`).
    trainer: the module `clipgen.train.<trainer>` whose make_stage(config) trains it.
    role: the cascade slot it fills (one of ROLES), or None outside the cascade.
    salt: folded into a sample's seed for this stage's random draws (None: it draws none).
    demo: its part of the demo, for stages the demo trains.
    """

    name: str
    config_file: str
    trainer: str
    role: str | None
    salt: int | None
    preset_prefix: str = ""
    demo: DemoPlan | None = None

    def preset(self, preset: str) -> str:
        """The name of this stage's variant of `preset` in its config file."""
        return self.preset_prefix + preset

    def config(self, preset: str) -> ml_collections.ConfigDict:
        """`configs/<config_file>.py:<preset(preset)>`."""
        return config_lib.load_preset(self.config_file, self.preset(preset))


# Demo speeds and set-up minutes as a 30-minute run measured them on an idle machine (CLIP's
# from 840-step runs of its demo preset: its convolutional stem costs 11% of the 168 steps a
# minute of the 8 px patchify). CLIP's 8 px patches leave the decoder, which learns slowest,
# more than half the training time.
STAGES = (
    StageSpec("clip", "clip", "clip", "clip", None, demo=DemoPlan(0.225, 149.0, 0.3)),
    StageSpec("prior", "prior", "prior", "prior", 1, demo=DemoPlan(0.12, 143.0, 0.8)),
    StageSpec("ar_prior", "ar_prior", "ar_prior", None, None),
    StageSpec("operator", "operator", "operator", None, 7),
    StageSpec("unet", "unet", "unet", None, 8),
    StageSpec("edit", "edit", "edit", None, 9),
    StageSpec("decoder", "decoder", "decoder", "decoder", 2, demo=DemoPlan(0.515, 270.0, 1.0)),
    StageSpec(
        "upsampler", "upsampler", "upsampler", "upsampler", 3, demo=DemoPlan(0.07, 346.0, 0.45)
    ),
    StageSpec(
        "upsampler2",
        "upsampler",
        "upsampler",
        "upsampler",
        4,
        preset_prefix="second_",
        demo=DemoPlan(0.07, 330.0, 0.6),
    ),
)


def get(name: str) -> StageSpec:
    """The stage called `name`."""
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise ValueError(f"no stage {name!r}; stages: {', '.join(spec.name for spec in STAGES)}")


def cascade() -> tuple[StageSpec, ...]:
    """The unCLIP cascade's stages in order: CLIP, prior, decoder, then the upsamplers."""
    in_cascade = [spec for spec in STAGES if spec.role is not None]
    return tuple(sorted(in_cascade, key=lambda spec: ROLES.index(spec.role)))


def demo_stages() -> tuple[StageSpec, ...]:
    """The stages `clipgen demo` trains, in the order it trains them."""
    return tuple(spec for spec in cascade() if spec.demo is not None)
