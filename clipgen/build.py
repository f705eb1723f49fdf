"""The builder layer: a stage's config -> its module, diffusion process, tokenizer and input
preprocessing, and `restore(run_dir)` -> a trained stage's config and (EMA) parameters for
inference. Training, sampling, embedding, evaluation, the demo and the CLI all build
through here (guided-diffusion's `create_model_and_diffusion`, once for everyone).

A config's `stage` names what it builds: clip, prior, ar_prior, decoder, upsampler, unet
(an unconditional UNet) or operator (a fine-tuned prior).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from clipgen.checkpoint import Checkpointer
from clipgen.data import pipeline, preprocess
from clipgen.data.tokenizer import Tokenizer
from clipgen.diffusion.gaussian import Diffusion, make_diffusion
from clipgen.errors import InputError
from clipgen.models.ar_prior import ARPrior, ARPriorConfig
from clipgen.models.clip import CLIP, TextConfig, VisionConfig
from clipgen.models.decoder import Decoder, DecoderConfig
from clipgen.models.prior import PriorConfig, PriorTransformer
from clipgen.models.unet import UNet, UNetConfig
from clipgen.models.upsampler import Upsampler, UpsamplerConfig

# --- tokenizers and preprocessing --------------------------------------------------------------


@functools.cache
def shapes_tokenizer(num_merges: int, context_length: int, seed: int = 0) -> Tokenizer:
    """The demo tokenizer: a BPE learnt from 5,000 training-split captions (the same in
    every process)."""
    source = pipeline.ProceduralShapes((), split="train", seed=seed)
    captions = [source[i]["caption"] for i in range(5000)]
    return Tokenizer.train(captions, num_merges=num_merges, context_length=context_length)


def tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """`config.data.tokenizer`: "shapes" (trained on the captions), OpenAI's
    bpe_simple_vocab .txt.gz, an HF tokenizer directory, or a clipgen tokenizer JSON."""
    name, length = config.data.tokenizer, config.data.context_length
    if name == "shapes":
        return shapes_tokenizer(config.data.num_merges, length, config.data.seed)
    path = Path(name)
    if path.is_dir():
        return Tokenizer.from_hf_directory(path, length)
    if path.name.endswith(".txt.gz"):
        return Tokenizer.from_bpe_vocab(path, length)
    if path.suffix == ".json":
        return Tokenizer.load(path)
    raise ValueError(f"config.data.tokenizer={name!r}: not 'shapes', a .txt.gz, dir or .json")


def clip_inputs(
    examples: list[dict], tokenizer: Tokenizer, image_key: str, resolution: int
) -> dict[str, np.ndarray]:
    """Examples (image, caption) -> CLIP's inputs: preprocessed pixels, ids and mask."""
    ids, mask = tokenizer.encode([pipeline.decode_text(e["caption"]) for e in examples])
    pixels = preprocess.clip_preprocess([e[image_key] for e in examples], resolution)
    return {"pixels": pixels, "input_ids": ids, "attention_mask": mask}


# --- modules -------------------------------------------------------------------------------------


def clip_module(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> CLIP:
    """The CLIP `config.model.{vision,text}` and `projection_dim` describe."""
    model = config.model
    return CLIP(
        vision=VisionConfig(**model.vision.to_dict()),
        text=TextConfig(
            vocab_size=tokenizer.vocab_size,
            context_length=tokenizer.context_length,
            eos_token_id=tokenizer.end_id,
            **model.text.to_dict(),
        ),
        projection_dim=model.projection_dim,
        dtype=jnp.dtype(model.dtype),
        scan_layers=model.get("scan", False),
        remat=model.get("remat", False),
    )


def prior_module(config: ml_collections.ConfigDict) -> PriorTransformer:
    """The diffusion prior transformer `config.model` describes."""
    model = config.model
    prior_config = PriorConfig(
        num_attention_heads=model.heads,
        attention_head_dim=model.head_dim,
        num_layers=model.layers,
        embedding_dim=model.embedding_dim,
        num_embeddings=model.num_text_tokens,
        encoder_hidden_dim=model.text_token_dim,
        additional_embeddings=4,
        dropout=model.dropout,
        added_emb_type="prd",
        encoder_hid_proj_type="linear",
    )
    return PriorTransformer(
        prior_config,
        dtype=jnp.dtype(model.dtype),
        scan_layers=model.get("scan", False),
        remat=model.get("remat", False),
    )


def ar_prior_module(config: ml_collections.ConfigDict) -> ARPrior:
    """The autoregressive prior `config.model` describes."""
    model = config.model
    return ARPrior(
        ARPriorConfig(
            width=model.width,
            heads=model.heads,
            layers=model.layers,
            embedding_dim=model.embedding_dim,
            num_codes=model.num_codes,
            num_buckets=model.num_buckets,
            num_dot_buckets=model.num_dot_buckets,
            num_text_tokens=model.num_text_tokens,
            text_token_dim=model.text_token_dim,
        ),
        dtype=jnp.dtype(model.dtype),
        scan_layers=model.get("scan", False),
        remat=model.get("remat", False),
    )


def decoder_module(config: ml_collections.ConfigDict) -> Decoder:
    """The decoder `config.model` describes: frozen CLIP text encodings (Karlo), or with
    `model.text_transformer` (TextConfig fields) GLIDE's trainable text transformer."""
    model = config.model
    text_transformer = model.get("text_transformer")
    text = (
        {"text_transformer": TextConfig(**text_transformer.to_dict())}
        if text_transformer
        else {"text_width": model.text_width, "text_embed_dim": model.clip_embed_dim}
    )
    decoder_config = DecoderConfig(
        unet=UNetConfig(**model.unet.to_dict()),
        clip_embed_dim=model.clip_embed_dim,
        clip_extra_tokens=model.clip_extra_tokens,
        image_embed_scale=model.get("image_embed_scale", 1.0),
        **text,
    )
    return Decoder(decoder_config, dtype=jnp.dtype(model.dtype))


def unet_module(config: ml_collections.ConfigDict) -> UNet:
    """The unconditional ADM UNet `config.model.unet` describes (the `unet` stage; the
    original DDPM's layout through its diffusers fields)."""
    return UNet(UNetConfig(**config.model.unet.to_dict()), dtype=jnp.dtype(config.model.dtype))


def upsampler_module(config: ml_collections.ConfigDict) -> Upsampler:
    """The upsampler `config.model` describes."""
    model = config.model
    unet = UNetConfig(**model.unet.to_dict())
    upsampler = UpsamplerConfig(unet, resize=model.resize, residual=model.get("residual", False))
    return Upsampler(upsampler, dtype=jnp.dtype(model.dtype))


_MODULES: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "prior": prior_module,
    "operator": prior_module,  # a pOps operator is a fine-tuned prior
    "ar_prior": ar_prior_module,
    "decoder": decoder_module,
    "upsampler": upsampler_module,
    "unet": unet_module,
}


def module(config: ml_collections.ConfigDict, text_tokenizer: Tokenizer | None = None) -> nn.Module:
    """The network of the stage `config.stage` names (a CLIP's tokenizer is built from the
    config unless given)."""
    if config.stage == "clip":
        return clip_module(config, text_tokenizer or tokenizer(config))
    if config.stage not in _MODULES:
        raise ValueError(
            f"config.stage={config.stage!r} builds no network here; stages with one: "
            f"clip, {', '.join(_MODULES)}"
        )
    return _MODULES[config.stage](config)


def diffusion(config: ml_collections.ConfigDict, respacing: str | None = None) -> Diffusion:
    """The Gaussian diffusion process of `config.diffusion` (variance fixed_small unless it
    says otherwise), respaced when asked."""
    settings = config.diffusion
    return make_diffusion(
        settings.schedule,
        settings.timesteps,
        prediction=settings.prediction,
        variance=settings.get("variance", "fixed_small"),
        respacing=respacing,
    )


# --- trained stages for inference ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trained:
    """A trained stage: the config it was trained with, its (EMA) parameters without
    logical-axis boxes, and the step they are from."""

    config: ml_collections.ConfigDict
    params: Any
    step: int


def restore(
    run_dir: str | Path,
    default_config: Callable[[], ml_collections.ConfigDict] | None = None,
    stage: str | None = None,
) -> Trained:
    """The newest readable checkpoint of a `clipgen train` run: its stored config (JSON
    lists turned back into the tuples configs are written with), or `default_config()` for
    a checkpoint that stores none, and its first EMA's parameters. With `stage` (the
    cascade slot's name) errors name it, and a run whose trainer differs from
    `default_config()`'s is refused."""
    directory = Path(run_dir) / "checkpoints"
    what = f"the {stage} stage" if stage else "the run"
    if not directory.is_dir():
        raise InputError(
            f"{what}: no checkpoints at {directory}; train it there first "
            f"(clipgen train --config configs/<stage>.py:<preset> --workdir {run_dir})"
        )
    checkpointer = Checkpointer(directory)
    try:
        saved, ema, step = checkpointer.restore_for_inference()
    except (InputError, FileNotFoundError) as error:
        raise InputError(f"{what}: {error}") from None
    finally:
        checkpointer.close()
    if saved:
        config = ml_collections.ConfigDict(_tuples(saved))
    elif default_config is not None:
        config = default_config()
        logging.warning("%s stores no config; using the %s preset", directory, config.stage)
    else:
        raise InputError(f"{directory} stores no config: give the preset it was trained with")
    expected = default_config().stage if stage and default_config else None
    if expected and config.get("stage") != expected:
        raise InputError(
            f"{what}: {directory} holds a {config.get('stage')!r} run, not a {expected!r} "
            f"one; put the {stage} run in {run_dir}"
        )
    return Trained(config, nn.meta.unbox(next(iter(ema.values()))), step)


@dataclasses.dataclass(frozen=True)
class ClipModel:
    """A CLIP ready for inference: its tokenizer, module and parameters."""

    tokenizer: Tokenizer
    module: CLIP
    params: Any


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """A diffusion stage ready for inference: module, parameters, the process it was
    trained with, the resolution of what it draws (0 for the prior), and the parameters of
    the same module that run the last sampling step instead (None: `params`; Karlo's
    super-resolution runs `super_res_first` on all steps but the last, `super_res_last` on
    the last)."""

    module: Any
    params: Any
    diffusion: Diffusion
    resolution: int = 0
    last_step_params: Any = None


def clip_model(config: ml_collections.ConfigDict, params: Any) -> ClipModel:
    """A CLIP stage's config and parameters as a ClipModel."""
    clip_tokenizer = tokenizer(config)
    return ClipModel(clip_tokenizer, clip_module(config, clip_tokenizer), nn.meta.unbox(params))


# Where a CLIP for inference comes from: a clipgen CLIP run (its `preset` for a checkpoint
# that stores no config), a transformers directory (`path`) with its tokenizer (that
# directory, an OpenAI .txt.gz vocabulary or a clipgen tokenizer .json), or "random": the
# `preset`'s CLIP with random weights (tests).
CLIP_SOURCE = {"source": "clipgen", "preset": "demo", "workdir": "", "path": "", "tokenizer": ""}


def load_clip(options: dict[str, Any], where: str = "clip") -> tuple[ClipModel, str]:
    """A CLIP from `options` (the keys of CLIP_SOURCE, all given) and a description of its
    backbone; errors name `where`."""
    if options["source"] == "clipgen":
        from clipgen import stages

        workdir, preset = Path(options["workdir"]), options["preset"]
        if not options["workdir"] or not (workdir / "checkpoints").is_dir():
            raise FileNotFoundError(
                f"{where}.workdir: no CLIP run at {str(workdir)!r} (no checkpoints/ in it); train "
                f"one with `clipgen train --config configs/clip.py:{preset} --workdir DIR` (or "
                "`clipgen demo`)"
            )
        trained = restore(workdir, functools.partial(stages.get("clip").config, preset))
        clip = clip_model(trained.config, trained.params)
        where_from = f"clipgen CLIP {preset} at {workdir}, step {trained.step}, EMA"
    elif options["source"] == "random":
        from clipgen import stages
        from clipgen.models.clip import init_clip

        config = stages.get("clip").config(options["preset"])
        text_tokenizer = tokenizer(config)
        module = clip_module(config, text_tokenizer)
        params = jax.jit(lambda key: nn.meta.unbox(init_clip(module, key))["params"])(
            jax.random.key(0)
        )
        clip = ClipModel(text_tokenizer, module, params)
        where_from = f"random CLIP {options['preset']}"
    elif options["source"] == "transformers":
        from clipgen.weights.clip import load_clip as load_transformers_clip

        path = Path(options["path"])
        if not options["path"] or not path.is_dir():
            raise FileNotFoundError(f"{where}.path: no transformers CLIP directory {str(path)!r}")
        module, params = load_transformers_clip(path)
        text_tokenizer = _clip_tokenizer(where, options["tokenizer"] or str(path), module)
        clip = ClipModel(text_tokenizer, module, params.get("params", params))
        where_from = f"transformers CLIP at {path}"
    else:
        raise ValueError(
            f"{where}.source={options['source']!r}; expected clipgen, transformers or random"
        )
    vision = clip.module.vision
    size = f"ViT {vision.image_size}px/{vision.patch_size}, width {vision.width} x {vision.layers}"
    return clip, f"{where_from} ({size})"


def _clip_tokenizer(where: str, spec: str, module: CLIP) -> Tokenizer:
    path, length = Path(spec), module.text.context_length
    if path.is_dir():
        text_tokenizer = Tokenizer.from_hf_directory(path, length)
    elif path.name.endswith(".txt.gz"):
        text_tokenizer = Tokenizer.from_bpe_vocab(path, length)
    elif path.suffix == ".json" and path.is_file():
        text_tokenizer = Tokenizer.load(path)
    else:
        raise FileNotFoundError(
            f"{where}.tokenizer: {spec!r} is not a tokenizer directory, .txt.gz vocab or .json"
        )
    if text_tokenizer.context_length > length or text_tokenizer.vocab_size > module.text.vocab_size:
        raise ValueError(
            f"{where}.tokenizer {spec}: context {text_tokenizer.context_length} / vocabulary "
            f"{text_tokenizer.vocab_size} exceed the model's {length} / {module.text.vocab_size}"
        )
    if module.text.eos_token_id not in (2, text_tokenizer.end_id):
        raise ValueError(
            f"{where}.tokenizer {spec}: its end token id {text_tokenizer.end_id} is not the "
            f"model's eos_token_id {module.text.eos_token_id}, so text pooling would be wrong"
        )
    return text_tokenizer


def diffusion_model(config: ml_collections.ConfigDict, params: Any) -> DiffusionModel:
    """A prior's, decoder's or upsampler's config and parameters as a DiffusionModel."""
    drawn = ("decoder", "upsampler", "unet")
    resolution = int(config.data.resolution) if config.stage in drawn else 0
    return DiffusionModel(module(config), nn.meta.unbox(params), diffusion(config), resolution)


def _tuples(tree: Any) -> Any:
    """JSON lists back to the tuples the configs were written with."""
    if isinstance(tree, dict):
        return {key: _tuples(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(value) for value in tree)
    return tree
