"""A CLIP for evaluation (CLIP score, CLIP-space Frechet distance): a clipgen CLIP run or a
transformers CLIP directory, with its tokenizer, embedding images and captions sharded
over the mesh."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh

from clipgen import build
from clipgen.eval import fid as fid_lib
from clipgen.eval.registry import merge_settings


@dataclasses.dataclass
class LoadedCLIP:
    """A CLIP ready to embed: its tokenizer, jitted image and text embedders over the
    mesh, the image size it takes, and a description of its backbone."""

    tokenizer: Any
    image_features: fid_lib.FeatureFn
    text_features: fid_lib.FeatureFn
    image_size: int
    backbone: str


@dataclasses.dataclass(frozen=True)
class _CLIPMethod:
    """`apply(variables, inputs)` of one CLIP method, the shape `make_feature_fn` runs."""

    module: Any
    method: str

    def apply(self, variables: Any, inputs: Any) -> Any:
        if self.method == "encode_text":  # ids and mask arrive stacked on the last axis
            return self.module.apply(variables, inputs[..., 0], inputs[..., 1], method=self.method)
        return self.module.apply(variables, inputs, method=self.method)


CLIP_DEFAULTS = build.CLIP_SOURCE


def load_clip_for_eval(where: str, config: Mapping[str, Any], mesh: Mesh) -> LoadedCLIP:
    """`{"source": "clipgen", "preset", "workdir"}` (a clipgen CLIP run, configs/clip.py
    preset, EMA weights) or `{"source": "transformers", "path", "tokenizer"}` (a
    save_pretrained directory; the tokenizer is that directory, an OpenAI .txt.gz vocab or a
    clipgen tokenizer .json)."""
    options = merge_settings(where, config, CLIP_DEFAULTS)
    clip, backbone = build.load_clip(options, where)
    variables = {"params": clip.params}
    return LoadedCLIP(
        clip.tokenizer,
        fid_lib.make_feature_fn(_CLIPMethod(clip.module, "encode_image"), variables, mesh),
        fid_lib.make_feature_fn(_CLIPMethod(clip.module, "encode_text"), variables, mesh),
        clip.module.vision.image_size,
        backbone,
    )
