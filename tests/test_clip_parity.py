"""clipgen's CLIP against transformers' PyTorch CLIP: tiny random models saved with
`save_pretrained` (and re-written in the OpenAI layout), loaded by clipgen.weights, compared
on the same inputs."""

from __future__ import annotations

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import linen as nn

from clipgen.models.clip import CLIP, TextConfig, VisionConfig, init_clip
from clipgen.weights import load_clip, load_openai_clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT, WIDTH, LAYERS, HEADS, MLP, PROJ = 128, 12, 32, 2, 4, 37, 16
IMAGE, PATCH = 30, 6
TOL = 1e-5

# Each row holds the legacy eos 2, the eos 99 and a larger id at three different positions,
# so pooling by argmax(ids), by the first 2 and by the first 99 disagree (rows 0 and 1 padded).
INPUT_IDS = np.array(
    [
        [0, 2, 45, 99, 120, 1, 1, 1, 1, 1, 1, 1],
        [0, 17, 126, 2, 33, 99, 8, 1, 1, 1, 1, 1],
        [0, 64, 2, 99, 5, 6, 7, 127, 9, 10, 11, 12],
    ]
)
ATTENTION_MASK = (np.arange(CONTEXT)[None] < np.array([[5], [7], [12]])).astype(np.int64)


def _text_config(act: str, eos: int) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=CONTEXT,
        hidden_act=act,
        eos_token_id=eos,
        bos_token_id=0,
        pad_token_id=1,
    )


def _vision_config(act: str) -> dict:
    return dict(
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        hidden_act=act,
    )


def _randomized(model, seed: int):
    """Eager attention, eval mode, and noise on every parameter so no mapping passes by luck."""
    model.config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        if hasattr(model.config, sub):
            getattr(model.config, sub)._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _pixels(seed: int = 0) -> np.ndarray:
    """NCHW float32 pixels for torch."""
    return np.random.default_rng(seed).normal(size=(2, 3, IMAGE, IMAGE)).astype(np.float32)


def _nhwc(pixels_nchw: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))


def _close(actual, expected, name: str, tol: float = TOL) -> float:
    """Assert |actual - expected| <= tol * max(1, |expected|) elementwise; return max abs diff."""
    actual, expected = np.asarray(actual), np.asarray(expected.detach().numpy())
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    diff = np.abs(actual - expected)
    bound = tol * np.maximum(1.0, np.abs(expected))
    assert (diff <= bound).all(), f"{name}: max abs diff {diff.max():.3g}"
    return float(diff.max())


@functools.cache
def _forward(module: CLIP):
    """One compiled function giving every CLIP output the module can serve."""

    def run(params, pixels, input_ids, attention_mask):
        out = {}
        if module.vision is not None:
            out["image"] = module.apply(params, pixels, method=CLIP.encode_image)
        if module.text is not None:
            out["text"] = module.apply(params, input_ids, attention_mask, method=CLIP.encode_text)
            out["hidden"] = module.apply(params, input_ids, attention_mask, method=CLIP.text_hidden)
        if module.vision is not None and module.text is not None:
            out["clip"] = module.apply(params, pixels, input_ids, attention_mask)
        return out

    return jax.jit(run)


def _clipgen_outputs(module, params, pixels_nchw):
    return _forward(module)(
        params, _nhwc(pixels_nchw), jnp.asarray(INPUT_IDS), jnp.asarray(ATTENTION_MASK)
    )


@pytest.fixture(
    scope="module", params=[("quick_gelu", 2), ("gelu", 99)], ids=["qgelu-eos2", "gelu-eos99"]
)
def hf_clip(request, tmp_path_factory):
    """A random tiny CLIPModel, its save_pretrained directory, and its outputs."""
    act, eos = request.param
    config = transformers.CLIPConfig(
        text_config=_text_config(act, eos), vision_config=_vision_config(act), projection_dim=PROJ
    )
    model = _randomized(transformers.CLIPModel(config), seed=eos)
    directory = tmp_path_factory.mktemp(f"clip_{act}_{eos}")
    model.save_pretrained(directory)
    pixels = _pixels()
    ids, mask = torch.as_tensor(INPUT_IDS), torch.as_tensor(ATTENTION_MASK)
    with torch.no_grad():
        reference = dict(
            out=model(input_ids=ids, pixel_values=torch.as_tensor(pixels), attention_mask=mask),
            image=model.get_image_features(pixel_values=torch.as_tensor(pixels)).pooler_output,
            text=model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
            hidden=model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state,
        )
    return dict(model=model, directory=directory, pixels=pixels, reference=reference, eos=eos)


def test_clip_model_parity(hf_clip):
    module, params = load_clip(hf_clip["directory"])
    assert module.text.eos_token_id == hf_clip["eos"]
    ours = _clipgen_outputs(module, params, hf_clip["pixels"])
    ref = hf_clip["reference"]
    _close(ours["image"], ref["image"], "image features")
    _close(ours["text"], ref["text"], "text features")
    _close(ours["hidden"], ref["hidden"], "text hidden states")
    for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        _close(ours["clip"][key], getattr(ref["out"], key), key)


def test_vision_with_projection_parity(tmp_path):
    config = transformers.CLIPVisionConfig(
        **_vision_config("gelu_pytorch_tanh"), projection_dim=PROJ
    )
    model = _randomized(transformers.CLIPVisionModelWithProjection(config), seed=3)
    model.save_pretrained(tmp_path)
    pixels = _pixels(1)
    with torch.no_grad():
        expected = model(pixel_values=torch.as_tensor(pixels)).image_embeds
    module, params = load_clip(tmp_path)
    assert module.text is None
    _close(_clipgen_outputs(module, params, pixels)["image"], expected, "image_embeds")
    with pytest.raises(ValueError, match="no text tower"):
        module.apply(params, jnp.asarray(INPUT_IDS), method=CLIP.encode_text)


def test_text_with_projection_parity(tmp_path):
    config = transformers.CLIPTextConfig(**_text_config("gelu", 99), projection_dim=PROJ)
    model = _randomized(transformers.CLIPTextModelWithProjection(config), seed=4)
    model.save_pretrained(tmp_path)
    ids, mask = torch.as_tensor(INPUT_IDS), torch.as_tensor(ATTENTION_MASK)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
    module, params = load_clip(tmp_path)
    assert module.vision is None
    ours = _clipgen_outputs(module, params, _pixels())
    _close(ours["text"], expected.text_embeds, "text_embeds")
    _close(ours["hidden"], expected.last_hidden_state, "last_hidden_state")
    with pytest.raises(ValueError, match="no vision tower"):
        module.apply(params, _nhwc(_pixels()), jnp.asarray(INPUT_IDS), method=CLIP.__call__)


def _openai_state_dict(hf_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The HF CLIPModel tensors renamed to OpenAI's layout, q/k/v stacked into in_proj
    (contiguous copies: safetensors writes a transposed view's buffer as is)."""
    out = {}
    for key, value in hf_state.items():
        name = key
        for old, new in (
            ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
            ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
            ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
            ("vision_model.pre_layrnorm", "visual.ln_pre"),
            ("vision_model.post_layernorm", "visual.ln_post"),
            ("vision_model.encoder.layers", "visual.transformer.resblocks"),
            ("text_model.embeddings.token_embedding", "token_embedding"),
            ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
            ("text_model.encoder.layers", "transformer.resblocks"),
            ("text_model.final_layer_norm", "ln_final"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("self_attn.out_proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            name = name.replace(old, new)
        if "self_attn.q_proj" in name:
            for part in ("weight", "bias"):
                if name.endswith(part):
                    stem = key[: -len(f"q_proj.{part}")]
                    out[name.replace(f"self_attn.q_proj.{part}", f"attn.in_proj_{part}")] = (
                        np.concatenate([hf_state[f"{stem}{p}_proj.{part}"] for p in "qkv"])
                    )
        elif "self_attn.k_proj" in name or "self_attn.v_proj" in name:
            continue
        elif name == "visual_projection.weight":
            out["visual.proj"] = np.ascontiguousarray(value.T)
        elif name == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(value.T)
        else:
            out[name] = value
    return out


def test_openai_layout_parity(hf_clip, tmp_path):
    hf_state = safetensors.numpy.load_file(str(hf_clip["directory"] / "model.safetensors"))
    openai_state = _openai_state_dict(hf_state)
    assert len(openai_state) == len(hf_state) - 2 * 4 * LAYERS  # per block: 6 q/k/v tensors -> 2
    path = tmp_path / "openai.safetensors"
    safetensors.numpy.save_file(openai_state, str(path))
    hf_module, _ = load_clip(hf_clip["directory"])
    if hf_clip["eos"] != 2:
        # OpenAI pools at argmax(ids), which only agrees with first-eos pooling at eos id 127.
        with pytest.raises(ValueError, match="argmax"):
            load_openai_clip(path, hf_module.vision, hf_module.text, PROJ)
        return
    module, params = load_openai_clip(path, hf_module.vision, hf_module.text, PROJ)
    ours = _clipgen_outputs(module, params, hf_clip["pixels"])
    ref = hf_clip["reference"]
    _close(ours["image"], ref["image"], "image features")
    _close(ours["text"], ref["text"], "text features")
    _close(ours["clip"]["logits_per_image"], ref["out"].logits_per_image, "logits_per_image")


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    """A saved tiny CLIPVisionModelWithProjection (config.json and its tensors)."""
    config = transformers.CLIPVisionConfig(**_vision_config("quick_gelu"), projection_dim=PROJ)
    directory = tmp_path_factory.mktemp("vision")
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(directory)
    return directory, safetensors.numpy.load_file(str(directory / "model.safetensors"))


def _edited_checkpoint(vision_checkpoint, tmp_path, edit):
    directory, tensors = vision_checkpoint
    tensors = dict(tensors)
    edit(tensors)
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_extra_key_is_named(vision_checkpoint, tmp_path):
    def add(tensors):
        tensors["vision_model.extra_head.weight"] = np.zeros((2, 2), np.float32)

    with pytest.raises(ValueError, match=r"unexpected keys.*vision_model\.extra_head\.weight"):
        load_clip(_edited_checkpoint(vision_checkpoint, tmp_path, add))


def test_missing_key_is_named(vision_checkpoint, tmp_path):
    def drop(tensors):
        del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]

    with pytest.raises(ValueError, match=r"missing keys.*layers\.1\.mlp\.fc2\.bias"):
        load_clip(_edited_checkpoint(vision_checkpoint, tmp_path, drop))


def test_wrong_shape_is_named(vision_checkpoint, tmp_path):
    def reshape(tensors):
        tensors["visual_projection.weight"] = np.zeros((PROJ, WIDTH + 1), np.float32)

    with pytest.raises(ValueError, match=r"visual_projection\.weight: checkpoint \(16, 33\)"):
        load_clip(_edited_checkpoint(vision_checkpoint, tmp_path, reshape))


def test_openai_in_proj_shape_is_checked(hf_clip, tmp_path):
    state = _openai_state_dict(
        safetensors.numpy.load_file(str(hf_clip["directory"] / "model.safetensors"))
    )
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    state[key] = np.zeros((3 * WIDTH + 1, WIDTH), np.float32)
    path = tmp_path / "openai.safetensors"
    safetensors.numpy.save_file(state, str(path))
    module, _ = load_clip(hf_clip["directory"])
    text = TextConfig(**{**module.text.__dict__, "eos_token_id": 2})
    with pytest.raises(
        ValueError, match=r"in_proj_weight: checkpoint \(97, 32\), expected \(96, 32\)"
    ):
        load_openai_clip(path, module.vision, text, PROJ)


def test_init_is_boxed_and_matches_loaded_tree(hf_clip):
    module, params = load_clip(hf_clip["directory"])
    boxed = jax.eval_shape(lambda rng: init_clip(module, rng), jax.random.key(0))
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    block = boxed["params"]["text_tower"]["block_0"]
    assert block["attn"]["query"]["kernel"].names == ("embed", "heads")
    assert block["attn"]["out"]["kernel"].names == ("heads", "embed")
    assert block["mlp"]["fc1"]["kernel"].names == ("embed", "mlp")
    assert boxed["params"]["text_tower"]["token_embed"]["embedding"].names == ("vocab", "embed")
    assert boxed["params"]["vision_tower"]["patch_embed"]["kernel"].names[-1] == "conv_out"
    assert not any(is_box(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_box))

    plain = nn.meta.unbox(boxed)
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(params)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(plain) == shapes(params)


def test_vision_only_module_refuses_text():
    module = CLIP(VisionConfig(IMAGE, PATCH, WIDTH, 1, HEADS, MLP), None, PROJ)
    params = jax.eval_shape(lambda rng: nn.meta.unbox(init_clip(module, rng)), jax.random.key(0))
    assert "logit_scale" not in params["params"]
    pixels, ids = jnp.zeros((1, IMAGE, IMAGE, 3)), jnp.asarray(INPUT_IDS)
    with pytest.raises(ValueError, match="no text tower"):
        jax.eval_shape(module.apply, params, pixels, ids)
    with pytest.raises(ValueError, match="needs at least one"):
        init_clip(CLIP(None, None, PROJ), jax.random.key(0))
