"""Whether the stages of an unCLIP cascade fit together: the prior's and decoder's widths
and context length against the CLIP's, the upsamplers against the stage table, and the
resolutions increasing along the cascade."""

from __future__ import annotations

from collections.abc import Sequence

from clipgen.build import ClipModel, DiffusionModel
from clipgen.models.decoder import Decoder
from clipgen.models.prior import PriorTransformer


def check_fit(
    clip_model: ClipModel,
    prior: DiffusionModel,
    decoder: DiffusionModel | None,
    upsamplers: Sequence[DiffusionModel],
    upsampler_names: Sequence[str],
) -> None:
    """Raise a ValueError listing every mismatch between the stages (none: return)."""
    clip, tokenizer = clip_model.module, clip_model.tokenizer
    problems = []
    if isinstance(prior.module, PriorTransformer):
        cfg = prior.module.config
        expected = {
            "embedding_dim": (cfg.embedding_dim, "projection_dim", clip.projection_dim),
            "encoder_hidden_dim": (cfg.encoder_hidden_dim, "text width", clip.text.width),
            "num_embeddings": (cfg.num_embeddings, "context length", tokenizer.context_length),
        }
        problems += [
            f"prior {key} is {mine}, the CLIP's {what} is {theirs}"
            for key, (mine, what, theirs) in expected.items()
            if mine != theirs
        ]
    if isinstance(getattr(decoder, "module", None), Decoder):
        cfg = decoder.module.config
        if cfg.clip_embed_dim != clip.projection_dim:
            problems.append(
                f"decoder clip_embed_dim is {cfg.clip_embed_dim}, the CLIP's projection_dim "
                f"is {clip.projection_dim}"
            )
        if cfg.text_transformer is None and cfg.token_width != clip.text.width:
            problems.append(
                f"decoder text_width is {cfg.token_width}, the CLIP text width is {clip.text.width}"
            )
        glide = cfg.text_transformer
        if glide is not None and glide.context_length != tokenizer.context_length:
            problems.append(
                f"the decoder's text transformer reads {glide.context_length} tokens, the "
                f"CLIP tokenizer gives {tokenizer.context_length}"
            )
    if len(upsampler_names) < len(upsamplers):
        problems.append(
            f"{len(upsamplers)} upsamplers, but the stage table has "
            f"{len(upsampler_names)} upsampler stages"
        )
    if decoder is None and upsamplers:
        problems.append("upsamplers without a decoder")
    sizes = [stage.resolution for stage in (decoder, *upsamplers) if stage]
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        problems.append(f"the cascade's resolutions {sizes} do not increase")
    if problems:
        raise ValueError(
            "the stages do not fit together: "
            + "; ".join(problems)
            + ". Train the prior and decoder on this CLIP's embeddings (their configs' "
            "model dimensions must be the CLIP's)."
        )
