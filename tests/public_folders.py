"""Tiny random public pipeline folders, written offline by diffusers' and transformers' own
`save_pretrained`: Karlo's `UnCLIPPipeline` layout (the schedulers as diffusers' conversion
script configures Karlo's) and Kandinsky 2.2's `KandinskyV22PriorPipeline` layout. Shared by
the parity tests and `benchmarks/unclip_sampling.py` (which passes larger widths)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    KandinskyV22PriorPipeline,
    PriorTransformer,
    UnCLIPPipeline,
    UnCLIPScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from clipgen.data.tokenizer import END, START, Tokenizer, byte_symbols

CAPTIONS = ["a red circle", "a blue square on the left", "a green triangle", "an orange circle"]
CONTEXT = 77


def _randomized(model, seed: int, scale: float = 0.1):
    """Noise on every parameter (zero-initialised layers too), eval mode; a CLIP model also
    switches to eager attention."""
    config = getattr(model, "config", None)
    if hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
            if name == "clip_std":
                param.add_(1.0)
            if name == "clip_mean":
                param.mul_(5.0)
    return model.eval()


def clip_tokenizer(root: Path, pad_token: str = "!") -> CLIPTokenizer:
    """A CLIP BPE learnt from a few captions in OpenAI's vocabulary layout, as transformers'
    CLIPTokenizer with Karlo's padding ("!", id 0) and 77 tokens."""
    corpus = [caption.lower() for caption in CAPTIONS] * 4 + ["a photo of a cat"] * 3
    merges = json.loads(Tokenizer.train(corpus, num_merges=60).backend.to_str())["model"]
    merges = [m.split() if isinstance(m, str) else m for m in merges["merges"]]
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    source = root / "bpe"
    source.mkdir(parents=True, exist_ok=True)
    (source / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens + [START, END])})
    )
    (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    return CLIPTokenizer.from_pretrained(source, model_max_length=CONTEXT, pad_token=pad_token)


def _text_encoder(vocab: int, width: int, dim: int, seed: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width + 5,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT,
        projection_dim=dim,
        bos_token_id=vocab - 2,
        eos_token_id=2,  # the legacy id, as openai/clip-vit-large-patch14: argmax pooling
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return _randomized(CLIPTextModelWithProjection(config), seed)


def _unclip_scheduler(prediction: str, variance: str, clip_range: float = 1.0):
    return UnCLIPScheduler(
        variance_type=variance,
        prediction_type=prediction,
        num_train_timesteps=1000,
        clip_sample_range=clip_range,
    )


def karlo_pipeline(
    root: Path,
    *,
    dim: int = 16,
    channels: tuple[int, ...] = (16, 32, 48),
    super_res_channels: tuple[int, ...] = (16, 32),
    decoder_size: int = 16,
    super_res_size: int = 32,
    prior_layers: int = 2,
) -> tuple[UnCLIPPipeline, Path]:
    """A random Karlo-layout UnCLIPPipeline (text width = CLIP dim = prior width, as in
    Karlo's ViT-L/14), saved to root/"karlo"; returns (pipeline, folder)."""
    tokenizer = clip_tokenizer(root)
    text_encoder = _text_encoder(len(tokenizer), dim, dim, seed=1)
    torch.manual_seed(2)
    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=dim // 2,
        num_layers=prior_layers,
        embedding_dim=dim,
        num_embeddings=CONTEXT,
        additional_embeddings=4,
    )
    cross = channels[0] + 8
    text_proj = UnCLIPTextProjModel(
        clip_extra_context_tokens=4,
        clip_embeddings_dim=dim,
        time_embed_dim=4 * channels[0],
        cross_attention_dim=cross,
    )
    decoder = UNet2DConditionModel(
        sample_size=decoder_size,
        in_channels=3,
        out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D",)
        + ("SimpleCrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (len(channels) - 1)
        + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross,
        attention_head_dim=8,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )
    super_res = dict(
        sample_size=super_res_size,
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D",) * len(super_res_channels),
        up_block_types=("ResnetUpsampleBlock2D",) * len(super_res_channels),
        block_out_channels=super_res_channels,
        in_channels=6,
        out_channels=3,
        norm_num_groups=8,
        add_attention=False,
    )
    first, last = UNet2DModel(**super_res), UNet2DModel(**super_res)
    pipe = UnCLIPPipeline(
        prior=_randomized(prior, 3),
        decoder=_randomized(decoder, 4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_proj=_randomized(text_proj, 5),
        super_res_first=_randomized(first, 6),
        super_res_last=_randomized(last, 7),
        prior_scheduler=_unclip_scheduler("sample", "fixed_small_log", 5.0),
        decoder_scheduler=_unclip_scheduler("epsilon", "learned_range"),
        super_res_scheduler=_unclip_scheduler("epsilon", "fixed_small_log"),
    )
    folder = root / "karlo"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


def kandinsky_prior_pipeline(
    root: Path, *, dim: int = 20
) -> tuple[KandinskyV22PriorPipeline, Path]:
    """A random Kandinsky 2.2 prior pipeline (prior with clip_mean / clip_std, CLIP text and
    image encoders of one projection width, its UnCLIPScheduler), saved to
    root/"kandinsky_prior"; returns (pipeline, folder)."""
    tokenizer = clip_tokenizer(root, pad_token=END)
    text_encoder = _text_encoder(len(tokenizer), dim, dim, seed=11)
    vision = CLIPVisionConfig(
        image_size=30,
        patch_size=6,
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=dim,
    )
    torch.manual_seed(12)
    image_encoder = _randomized(CLIPVisionModelWithProjection(vision), 12)
    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=dim // 2,
        num_layers=2,
        embedding_dim=dim,
        num_embeddings=CONTEXT,
        additional_embeddings=4,
    )
    pipe = KandinskyV22PriorPipeline(
        prior=_randomized(prior, 13),
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_unclip_scheduler("sample", "fixed_small_log", 10.0),
        image_processor=CLIPImageProcessor(crop_size=30, size=30),
    )
    folder = root / "kandinsky_prior"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


def torch_noise(seed: int, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The standard-normal draws a torch.Generator seeded `seed` gives for `shapes` in
    order: what a diffusers pipeline given that generator (and its starting latents) adds
    at its steps, since only the schedulers' steps draw from it then."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).numpy() for shape in shapes]
