"""`clip_score`: CLIP score of generated images against their captions, with the
conventions declared, and the Frechet distance to the real images in CLIP's image space."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from clipgen.data.preprocess import clip_preprocess
from clipgen.eval import batching, registry
from clipgen.eval.captions import caption_source
from clipgen.eval.clip_model import load_clip_for_eval
from clipgen.eval.clip_score import CLAMP_PLACES, clip_frechet_distance, clip_score


class Evaluator(registry.Evaluator):
    """CLIP score of generated images against their captions (conventions declared in the
    extras), and with `clip_fd` the Frechet distance between the CLIP image embeddings of
    the generated and the real images of the same captions."""

    DEFAULTS = {
        "captions": None,
        "clip": None,
        "backbone": "",
        "scale": 100.0,
        "clamp": "mean",
        "caption_prefix": "",
        "clip_fd": True,
        "batch_size": 64,
        "seed": 0,
        "optional": False,
    }

    def __init__(self, name: str, config: Mapping[str, Any], **kwargs: Any):
        super().__init__(name, config, **kwargs)
        where, options = f"evals.{name}", self.settings
        if options["clamp"] not in CLAMP_PLACES:
            raise ValueError(f"{where}.clamp={options['clamp']!r}; expected one of {CLAMP_PLACES}")
        self.captions = caption_source(f"{where}.captions", options["captions"])
        self.caption_sources = [self.captions]
        clip_options = options["clip"] or {}
        if options["optional"] and not (clip_options.get("workdir") or clip_options.get("path")):
            raise registry.Skipped(
                "no CLIP given: set clip.path (transformers) or clip.workdir (clipgen)"
            )
        self.clip = load_clip_for_eval(f"{where}.clip", clip_options, self.mesh)

    def _embed_images(self, rows_to_images, desc: str) -> np.ndarray:
        _, embeds = batching.sharded_features(
            lambda number, rows: clip_preprocess(
                rows_to_images(number, rows), self.clip.image_size
            ),
            len(self.captions),
            self.clip.image_features,
            int(self.settings["batch_size"]),
            keep_features=True,
            desc=desc,
        )
        return embeds

    def __call__(self, generate: registry.Generator) -> dict[str, float]:
        options = self.settings
        captions = self.captions.captions
        resolutions: list[int] = []
        generate_rows = batching.generated_rows(generate, captions, options["seed"], self.name)

        def generated(number: int, rows: np.ndarray) -> np.ndarray:
            images = generate_rows(number, rows)
            resolutions.append(images.shape[1])
            return images

        image_embeds = self._embed_images(generated, f"{self.name}: generate + CLIP")
        prefix = options["caption_prefix"]

        def tokens(_, rows: np.ndarray) -> np.ndarray:
            ids, mask = self.clip.tokenizer.encode([prefix + captions[int(row)] for row in rows])
            return np.stack([ids, mask], axis=-1)

        _, text_embeds = batching.sharded_features(
            tokens,
            len(captions),
            self.clip.text_features,
            int(options["batch_size"]),
            keep_features=True,
            desc=f"{self.name}: captions",
        )
        score = clip_score(
            image_embeds,
            text_embeds,
            backbone=options["backbone"] or self.clip.backbone,
            scale=float(options["scale"]),
            clamp=options["clamp"],
            caption_prefix=prefix,
        )
        metrics = {"clip_score": score["clip_score"]}
        self.extras = {
            key: score[key] for key in ("backbone", "scale", "clamp", "caption_prefix")
        } | {
            "num_samples": score["num_samples"],
            "per_sample_std": float(np.std(score["per_sample"])),
            "captions": self.captions.describe(),
        }
        if options["clip_fd"]:
            resolution = resolutions[0]
            real_embeds = self._embed_images(
                lambda _, rows: self.captions.real_images(rows, resolution),
                f"{self.name}: real images + CLIP",
            )
            metrics["clip_fd"] = clip_frechet_distance(real_embeds, image_embeds)
            self.extras["clip_fd"] = {
                "space": "CLIP image embeddings as projected, unnormalised (clean-fid CLIP-FID)",
                "real_images": f"the captions' real images at the generated {resolution} px",
            }
        return metrics
