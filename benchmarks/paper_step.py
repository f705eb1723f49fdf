"""A paper preset's train step set up for lowering on a mesh of fake CPU devices: what
paper_presets.py, scaling.py and compile_time.py share. Import it after the fake device
count is set (XLA_FLAGS), as they do."""

from __future__ import annotations

from typing import Any

CLIP_TOKENIZER_HELP = (
    "OpenAI's bpe_simple_vocab_16e6.txt.gz (49,408 tokens); default: the shapes BPE, whose "
    "small vocabulary understates CLIP's token table"
)


def paper_config(
    file: str, preset: str, devices: int, fsdp: int, clip_tokenizer: str = "", **overrides: Any
):
    """`configs/<file>.py:<preset>` on a data x fsdp mesh of `devices`: synthetic embeddings
    (the step's shapes only; 1,024 examples, from which the AR prior fits its 319-dim PCA)
    or the shapes world's images in place of an image folder, CLIP's tokenizer
    `clip_tokenizer` or the shapes BPE, and `overrides` (dotted keys, as
    clipgen.config.load_preset takes them)."""
    from clipgen import config as config_lib

    config = config_lib.load_preset(file, preset, overrides)
    if "embeddings" in config.data:
        config.data.embeddings = "synthetic"
        config.data.num_examples = dict(train=1024)
    if config.data.get("folder"):
        config.data.folder = ""  # the shapes world at the preset's resolution
    if config.stage == "clip":
        config.data.tokenizer = clip_tokenizer or "shapes"
    config.mesh = dict(data=devices // fsdp, fsdp=fsdp, tensor=1)
    return config


def prepare(config, compile_step: bool = True):
    """The stage's loop.prepare for `config`: its (compiled or lowered) step and shardings."""
    from clipgen import train
    from clipgen.train import loop

    stage = train.trainer(config.stage).make_stage(config)
    return loop.prepare(config, stage, compile_step=compile_step)
