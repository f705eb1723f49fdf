"""A CLIP for evaluation (CLIP score, CLIP-space Frechet distance): a clipgen CLIP run or a
transformers CLIP directory, with its tokenizer, embedding images and captions sharded
over the mesh."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from clipgen import build, stages
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


CLIP_DEFAULTS = {"source": "clipgen", "preset": "demo", "workdir": "", "path": "", "tokenizer": ""}


def load_clip_for_eval(where: str, config: Mapping[str, Any], mesh: Mesh) -> LoadedCLIP:
    """`{"source": "clipgen", "preset", "workdir"}` (a clipgen CLIP run, configs/clip.py
    preset, EMA weights) or `{"source": "transformers", "path", "tokenizer"}` (a
    save_pretrained directory; the tokenizer is that directory, an OpenAI .txt.gz vocab or a
    clipgen tokenizer .json)."""
    options = merge_settings(where, config, CLIP_DEFAULTS)
    if options["source"] == "clipgen":
        workdir, preset = Path(options["workdir"]), options["preset"]
        if not options["workdir"] or not (workdir / "checkpoints").is_dir():
            raise FileNotFoundError(
                f"{where}.workdir: no CLIP run at {str(workdir)!r} (no checkpoints/ in it); train "
                f"one with `clipgen train --config configs/clip.py:{options['preset']} "
                f"--workdir DIR` (or `clipgen demo`)"
            )
        trained = build.restore(workdir, functools.partial(stages.get("clip").config, preset))
        clip = build.clip_model(trained.config, trained.params)
        tokenizer, module, params = clip.tokenizer, clip.module, clip.params
        vision = module.vision
        backbone = (
            f"clipgen CLIP {preset} (ViT {vision.image_size}px/{vision.patch_size}, "
            f"width {vision.width} x {vision.layers}) at {workdir}, step {trained.step}, EMA"
        )
    elif options["source"] == "transformers":
        from clipgen.weights.clip import load_clip

        path = Path(options["path"])
        if not options["path"] or not path.is_dir():
            raise FileNotFoundError(f"{where}.path: no transformers CLIP directory {str(path)!r}")
        module, params = load_clip(path)
        tokenizer = _load_tokenizer(where, options["tokenizer"] or str(path), module)
        vision = module.vision
        backbone = (
            f"transformers CLIP at {path} (ViT {vision.image_size}px/{vision.patch_size}, "
            f"width {vision.width} x {vision.layers})"
        )
    else:
        raise ValueError(f"{where}.source={options['source']!r}; expected clipgen or transformers")
    variables = params if "params" in params else {"params": params}
    return LoadedCLIP(
        tokenizer,
        fid_lib.make_feature_fn(_CLIPMethod(module, "encode_image"), variables, mesh),
        fid_lib.make_feature_fn(_CLIPMethod(module, "encode_text"), variables, mesh),
        module.vision.image_size,
        backbone,
    )


def _load_tokenizer(where: str, spec: str, module: Any) -> Any:
    from clipgen.data.tokenizer import Tokenizer

    path, length = Path(spec), module.text.context_length
    if path.is_dir():
        tokenizer = Tokenizer.from_hf_directory(path, length)
    elif path.name.endswith(".txt.gz"):
        tokenizer = Tokenizer.from_bpe_vocab(path, length)
    elif path.suffix == ".json" and path.is_file():
        tokenizer = Tokenizer.load(path)
    else:
        raise FileNotFoundError(
            f"{where}.tokenizer: {spec!r} is not a tokenizer directory, .txt.gz vocab or .json"
        )
    if tokenizer.context_length > length or tokenizer.vocab_size > module.text.vocab_size:
        raise ValueError(
            f"{where}.tokenizer {spec}: context {tokenizer.context_length} / vocabulary "
            f"{tokenizer.vocab_size} exceed the model's {length} / {module.text.vocab_size}"
        )
    if module.text.eos_token_id not in (2, tokenizer.end_id):
        raise ValueError(
            f"{where}.tokenizer {spec}: its end token id {tokenizer.end_id} is not the model's "
            f"eos_token_id {module.text.eos_token_id}, so text pooling would be wrong"
        )
    return tokenizer
