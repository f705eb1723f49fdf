"""Public diffusers pipeline folders as clipgen cascades, each with its own conventions as
data (`Sampling`, `StageSampling`, `DiffusionModel.last_step_params`), which `UnCLIP`
follows as it follows a trained cascade's:

- Karlo (`UnCLIPPipeline`: prior, text_encoder, tokenizer, text_proj, decoder,
  super_res_first, super_res_last and the three UnCLIPSchedulers): raw CLIP embeddings
  (no L2 normalisation) into the prior and decoder and raw prior draws into the decoder;
  both guided against the empty caption (the decoder with its null image embedding); one
  64 -> 256 super-resolution stage whose last step runs `super_res_last`; the schedulers'
  timesteps ("unclipN"), variances and x0 clamps; Karlo's defaults of 25 / 25 / 7 steps and
  guidance 4 / 8.
- Kandinsky 2.2's prior (`KandinskyV22PriorPipeline`: prior, text_encoder, image_encoder,
  tokenizer, scheduler): a prior-only cascade with the same prior conventions (its
  clip_mean / clip_std are the prior's `post_process_latents`), 25 steps, guidance 4;
  `zero_image_embed` is its negative image embedding.

`clipgen.pipelines.unclip.load_pipeline(path)` builds the cascade from these parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from clipgen.build import ClipModel, DiffusionModel
from clipgen.data.tokenizer import Tokenizer
from clipgen.errors import InputError
from clipgen.models.clip import CLIP
from clipgen.pipelines.sampling_settings import Sampling, StageSampling
from clipgen.weights import load_clip, load_clip_towers, load_prior, load_scheduler, load_unet
from clipgen.weights.pipeline import MODEL_INDEX, component_dir, read_model_index, sample_size

# The diffusers pipelines' defaults: steps per stage and guidance scales.
KARLO_STEPS = {"prior": 25, "decoder": 25, "upsampler": 7}
KARLO_GUIDANCE = {"prior": 4.0, "decoder": 8.0}
KANDINSKY_PRIOR_STEPS, KANDINSKY_PRIOR_GUIDANCE = 25, 4.0
_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_TEXT = "CLIPTextModelWithProjection"


def is_pipeline_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers pipeline folder (it holds a model_index.json)."""
    return (Path(path) / MODEL_INDEX).is_file()


def read_folder(path: str | Path) -> dict[str, Any]:
    """The cascade a pipeline folder holds, as `unclip.from_params` keyword arguments (clip,
    prior, decoder, upsamplers, sampling), by its model_index.json's `_class_name`."""
    index = read_model_index(path)
    kind = index.get("_class_name")
    if kind == "UnCLIPPipeline":
        return karlo(path, index)
    if kind == "KandinskyV22PriorPipeline":
        return kandinsky_prior(path, index)
    raise InputError(
        f"{Path(path) / MODEL_INDEX}: a {kind}; clipgen reads UnCLIPPipeline (Karlo) and "
        "KandinskyV22PriorPipeline folders"
    )


def karlo(path: str | Path, index: dict[str, Any] | None = None) -> dict[str, Any]:
    """Karlo's UnCLIPPipeline folder as cascade parts with Karlo's conventions."""
    index = index or read_model_index(path)
    clip = _text_clip(path, index, load_clip(_dir(path, index, "text_encoder")))
    prior, prior_clip = _prior(path, index, "prior_scheduler")
    decoder_dir = _dir(path, index, "decoder", "UNet2DConditionModel")
    proj_dir = _dir(path, index, "text_proj", "UnCLIPTextProjModel")
    module, params = load_unet(decoder_dir, text_proj_path=proj_dir)
    scheduler = load_scheduler(_dir(path, index, "decoder_scheduler", "UnCLIPScheduler"))
    decoder = DiffusionModel(
        module, params["params"], scheduler.diffusion, sample_size(decoder_dir)
    )
    first_dir = _dir(path, index, "super_res_first", "UNet2DModel")
    first, first_params = load_unet(first_dir)
    last, last_params = load_unet(_dir(path, index, "super_res_last", "UNet2DModel"))
    if last != first:
        raise InputError(
            f"{path}: super_res_last's network differs from super_res_first's ({last} vs "
            f"{first}); clipgen switches parameters, not networks, on the last step"
        )
    super_res_scheduler = load_scheduler(
        _dir(path, index, "super_res_scheduler", "UnCLIPScheduler")
    )
    super_res = DiffusionModel(
        first,
        first_params["params"],
        super_res_scheduler.diffusion,
        sample_size(first_dir),
        last_step_params=last_params["params"],
    )
    steps, guidance = KARLO_STEPS, KARLO_GUIDANCE
    settings = (
        ("prior", _stage(steps["prior"], guidance["prior"], prior_clip)),
        ("decoder", _stage(steps["decoder"], guidance["decoder"], scheduler.clip)),
        ("upsampler", _stage(steps["upsampler"], 1.0, super_res_scheduler.clip)),
    )
    return {
        "clip": clip,
        "prior": prior,
        "decoder": decoder,
        "upsamplers": (super_res,),
        "sampling": Sampling(settings, embed_norm="raw"),
    }


def kandinsky_prior(path: str | Path, index: dict[str, Any] | None = None) -> dict[str, Any]:
    """Kandinsky 2.2's prior pipeline folder as a prior-only cascade with its conventions."""
    index = index or read_model_index(path)
    towers = load_clip_towers(
        _dir(path, index, "text_encoder"),
        _dir(path, index, "image_encoder", "CLIPVisionModelWithProjection"),
    )
    clip = _text_clip(path, index, towers)
    prior, prior_clip = _prior(path, index, "scheduler")
    prior_settings = _stage(KANDINSKY_PRIOR_STEPS, KANDINSKY_PRIOR_GUIDANCE, prior_clip)
    return {
        "clip": clip,
        "prior": prior,
        "decoder": None,
        "upsamplers": (),
        "sampling": Sampling((("prior", prior_settings),), embed_norm="raw"),
    }


def zero_image_embed(clip: ClipModel, batch: int = 1) -> jax.Array:
    """Kandinsky 2.2's negative image embedding (its prior pipeline's `get_zero_embed`): the
    raw CLIP image embedding of all-zero pixels, already normalised as CLIP's input, (batch,
    D)."""
    size = clip.module.vision.image_size
    pixels = jnp.zeros((1, size, size, clip.module.vision.channels), jnp.float32)
    embed = clip.module.apply({"params": clip.params}, pixels, method=CLIP.encode_image)
    return jnp.repeat(jnp.asarray(embed, jnp.float32), batch, axis=0)


# --- parts ------------------------------------------------------------------------------------


def _dir(path: str | Path, index: dict[str, Any], name: str, kind: str | tuple = _TEXT) -> Path:
    """Component `name`'s folder, holding a `kind` (one of them)."""
    return component_dir(path, index, name, kind)


def _text_clip(path: str | Path, index: dict[str, Any], loaded: tuple[CLIP, Any]) -> ClipModel:
    """The pipeline's tokenizer (context: its model_max_length, at most the text tower's)
    with a loaded CLIP."""
    module, params = loaded
    if module.text is None:
        text_dir = Path(path) / "text_encoder"
        raise InputError(
            f"{text_dir / 'config.json'} describes a CLIP without a text tower; the pipeline's "
            "text_encoder must be a CLIPTextModelWithProjection"
        )
    tokenizer = Tokenizer.from_hf_directory(_dir(path, index, "tokenizer", _TOKENIZERS), None)
    length = min(tokenizer.context_length, module.text.context_length)
    tokenizer = Tokenizer(tokenizer.backend, length, tokenizer.pad_id)
    return ClipModel(tokenizer, module, params["params"])


def _prior(
    path: str | Path, index: dict[str, Any], scheduler_name: str
) -> tuple[DiffusionModel, float]:
    """The prior and its scheduler's x0 clamp."""
    module, params = load_prior(_dir(path, index, "prior", "PriorTransformer"))
    scheduler = load_scheduler(_dir(path, index, scheduler_name, "UnCLIPScheduler"))
    return DiffusionModel(module, params["params"], scheduler.diffusion), scheduler.clip


def _stage(steps: int, guidance: float, clip: float) -> StageSampling:
    """A stage sampled as diffusers' UnCLIPScheduler steps it (x0 clamped to +-clip; inf:
    not at all), guided against the empty caption."""
    return StageSampling(
        f"unclip{steps}", "ddpm", guidance=guidance, clip=clip, guidance_null="empty_caption"
    )
