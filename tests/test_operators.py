"""pOps operators: the conditioning layout against the official code's tensors on a tiny
Kandinsky-2.2-layout diffusers prior, operator weights from a torch state dict, the
shapes-world operator data, LoRA and partial training, sharded and resumed runs, the
inference pipeline and its embedding files."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen import config as config_lib
from clipgen import lora, operators
from clipgen.data import operator_data, shapes
from clipgen.pipelines import operators as operator_pipeline
from clipgen.train import loop
from clipgen.train import operator as operator_stage
from clipgen.train import prior as prior_stage
from clipgen.weights import load_prior, load_prior_state_dict

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
SLOTS, DIM = 77, 16
KANDINSKY_TINY = dict(  # Kandinsky 2.2's prior layout (prd query, 77 slots, 4 extra) shrunk
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    embedding_dim=DIM,
    num_embeddings=SLOTS,
    additional_embeddings=4,
    added_emb_type="prd",
)


def _random_prior(seed: int):
    torch.manual_seed(seed)
    model = diffusers.PriorTransformer(**KANDINSKY_TINY)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
            if name == "clip_std":
                param.add_(1.0)
    return model.eval()


def _pops_tensors(embeds, mean, std, drops):
    """The official code's prior inputs: `pops_utils.preprocess` (normalised inputs as token
    states, a dropped one zeroed, zero proj_embedding) and `pOpsPipeline.__call__` (the
    states in the first slots of a zero sequence as long as the text encoder's, the mask
    on those slots)."""
    states = [((e - mean) / std).unsqueeze(1) for e in embeds]
    for row, row_drops in enumerate(drops):
        for index, drop in enumerate(row_drops):
            if drop:
                states[index][row] = torch.zeros_like(states[index][row])
    hidden_states = torch.concat(states, dim=1)
    input_embeds = torch.zeros_like(states[0].squeeze(1))
    sequence = torch.zeros(hidden_states.shape[0], SLOTS, DIM)
    sequence[:, : hidden_states.shape[1]] = hidden_states
    mask = torch.zeros(hidden_states.shape[0], SLOTS)
    mask[:, : hidden_states.shape[1]] = 1
    return input_embeds, sequence, mask


@pytest.fixture(scope="module")
def kandinsky_prior(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    model = _random_prior(0)
    model.save_pretrained(root)
    return model, root


def test_operator_prediction_equals_diffusers_on_the_official_layout(kandinsky_prior):
    model, root = kandinsky_prior
    module, variables = load_prior(root)
    params = variables["params"]
    rng = np.random.default_rng(0)
    batch = 3
    embeds = [torch.from_numpy(rng.standard_normal((batch, DIM)).astype(np.float32))] * 2
    embeds = [embeds[0], torch.from_numpy(rng.standard_normal((batch, DIM)).astype(np.float32))]
    noisy = rng.standard_normal((batch, DIM)).astype(np.float32)
    t = np.array([3, 500, 999])
    mean, std = model.clip_mean.detach(), model.clip_std.detach()
    for drops in (
        [(False, False)] * batch,  # both inputs
        [(False, True), (True, False), (False, False)],  # one dropped (per row)
        [(True, True)] * batch,  # the unconditional branch
    ):
        proj, sequence, mask = _pops_tensors(embeds, mean, std, drops)
        with torch.no_grad():
            expected = model(
                torch.from_numpy(noisy),
                timestep=torch.from_numpy(t),
                proj_embedding=proj,
                encoder_hidden_states=sequence,
                attention_mask=mask,
            ).predicted_image_embedding.numpy()
        latents = operators.normalize(
            jnp.stack([jnp.asarray(e.numpy()) for e in embeds], 1),
            params["clip_mean"][:, None],
            params["clip_std"][:, None],
        )
        cond = operators.condition(latents, module, dropped=np.array(drops))
        np.testing.assert_allclose(np.asarray(cond["text_tokens"]), sequence.numpy(), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(cond["text_mask"]), mask.numpy())
        ours = module.apply(
            {"params": params}, noisy, t, cond["text_embed"], cond["text_tokens"], cond["text_mask"]
        )
        np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=TOL)


def test_operator_state_dict_loads_over_its_base_and_non_tensors_are_refused(
    kandinsky_prior, tmp_path
):
    base_model, root = kandinsky_prior
    module, base_params = load_prior(root)
    operator = _random_prior(7)  # the fine-tuned weights; pOps saves them without the stats
    state = {k: v for k, v in operator.state_dict().items() if k not in ("clip_mean", "clip_std")}
    path = tmp_path / "learned_prior.pth"
    torch.save(state, path)
    params = load_prior_state_dict(path, module, base_params)["params"]
    with torch.no_grad():
        operator.clip_mean.copy_(base_model.clip_mean)
        operator.clip_std.copy_(base_model.clip_std)
    rng = np.random.default_rng(1)
    noisy = rng.standard_normal((2, DIM)).astype(np.float32)
    sequence = rng.standard_normal((2, SLOTS, DIM)).astype(np.float32)
    mask = np.zeros((2, SLOTS), np.float32)
    mask[:, :2] = 1
    with torch.no_grad():
        expected = operator(
            torch.from_numpy(noisy),
            timestep=torch.tensor([10, 900]),
            proj_embedding=torch.zeros(2, DIM),
            encoder_hidden_states=torch.from_numpy(sequence),
            attention_mask=torch.from_numpy(mask),
        ).predicted_image_embedding.numpy()
    ours = module.apply(
        {"params": params}, noisy, np.array([10, 900]), np.zeros((2, DIM)), sequence, mask
    )
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(params["clip_mean"], base_params["params"]["clip_mean"])
    for bad in ({"weight": torch.zeros(2), "step": 3}, [torch.zeros(2)]):
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match="not a flat state dict of tensors"):
            load_prior_state_dict(tmp_path / "bad.pth", module, base_params)


@dataclasses.dataclass
class _Opaque:
    value: int


def test_a_pth_holding_objects_is_never_unpickled(kandinsky_prior, tmp_path):
    module, base_params = load_prior(kandinsky_prior[1])
    torch.save({"weight": _Opaque(1)}, tmp_path / "object.pth")
    with pytest.raises(ValueError, match="refused"):
        load_prior_state_dict(tmp_path / "object.pth", module, base_params)


def test_layout_pads_narrow_embeddings_and_places_instruction_tokens():
    inputs = jnp.arange(2 * 1 * 3, dtype=jnp.float32).reshape(2, 1, 3) + 1
    states = jnp.ones((2, 3, 5))
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    hidden, got_mask, proj = operators.layout(
        inputs, num_slots=6, token_dim=5, text_states=states, text_mask=mask
    )
    assert hidden.shape == (2, 6, 5) and proj.shape == (2, 3) and not proj.any()
    np.testing.assert_array_equal(hidden[:, 0, :3], inputs[:, 0])
    assert not hidden[:, 0, 3:].any() and not hidden[:, 4:].any()
    np.testing.assert_array_equal(got_mask, [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    dropped, mask_dropped, _ = operators.layout(
        inputs, num_slots=6, token_dim=5, dropped=jnp.ones((2, 1), bool),
        text_states=states, text_mask=mask,
    )  # fmt: skip
    assert not dropped.any()  # the unconditional branch: inputs and text zero, mask kept
    np.testing.assert_array_equal(mask_dropped, got_mask)
    with pytest.raises(ValueError, match="do not fit"):
        operators.layout(inputs, num_slots=3, token_dim=5, text_states=states, text_mask=mask)


@pytest.mark.parametrize("operator", operator_data.OPERATORS)
def test_operator_data_keeps_heldout_pairs_out_of_train_and_test(operator):
    def heldout(scene):
        return any((o.colour, o.shape) in shapes.HELDOUT_PAIRS for o in scene.objects)

    for split in shapes.SPLITS:
        for index in range(60):
            example = operator_data.example(operator, split, index)
            scenes = [x for x in (*example.inputs, example.target) if isinstance(x, shapes.Scene)]
            if split == "heldout":
                assert heldout(example.target), (operator, index)
            else:
                assert not any(heldout(scene) for scene in scenes), (operator, split, index)
            assert example == operator_data.example(operator, split, index)  # deterministic
    recolour = operator_data.example("recolour", "test", 3)
    scene, swatch = recolour.inputs
    assert recolour.target == dataclasses.replace(
        scene, objects=(dataclasses.replace(scene.objects[0], colour=swatch.colour),)
    )
    image = operator_data.render_input(swatch, 16)
    assert (image == shapes.COLOURS[swatch.colour]).all()


def _initial_params(config, stage):
    """The parameters a run of `stage` starts from, on the host."""
    prepared = loop.prepare(config, stage, jax.devices()[:1], compile_step=False)
    return _host(prepared.init_state().params)


def test_lora_starts_as_the_base_and_trains_only_adapters(tmp_path):
    config = config_lib.load_preset("operator", "tiny,recolour")
    config.lora.rank = 2
    stage = operator_stage.make_stage(config)
    params = _initial_params(config, stage)
    merged = lora.merge(params["base"], params["lora"], config.lora.alpha)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params["base"]), strict=True):
        np.testing.assert_array_equal(a, b)  # B starts at zero
    state = loop.train(config, tmp_path, stage, jax.devices()[:1])
    for a, b in zip(
        jax.tree.leaves(state.params["base"]), jax.tree.leaves(params["base"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (
        np.abs(np.asarray(state.params["lora"]["block_0"]["attn"]["query"]["kernel"]["b"])).max()
        > 0
    )


def test_training_only_the_first_blocks_leaves_the_rest(tmp_path):
    config = config_lib.load_preset("operator", "tiny,union")
    config.train_blocks = 1
    stage = operator_stage.make_stage(config)
    first = _initial_params(config, stage)
    state = loop.train(config, tmp_path, stage, jax.devices()[:1])
    trained = jax.tree.map(np.asarray, state.params)
    assert not np.array_equal(
        trained["block_0"]["attn"]["query"]["kernel"], first["block_0"]["attn"]["query"]["kernel"]
    )
    for name in ("output_proj", "time_embed_in", "clip_mean"):
        for a, b in zip(jax.tree.leaves(trained[name]), jax.tree.leaves(first[name]), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))


@pytest.fixture(scope="module")
def tiny_prior_run(tmp_path_factory):
    """A tiny clipgen prior run to fine-tune operators from."""
    directory = tmp_path_factory.mktemp("prior_run")
    config = config_lib.load_preset("prior", "tiny")
    loop.train(config, directory, prior_stage.make_stage(config), jax.devices()[:1])
    return directory


def _operator_config(prior_run, name="union"):
    config = config_lib.load_preset("operator", f"tiny,{name}")
    config.init.prior = str(prior_run)
    return config


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_an_operator_starts_from_its_prior_and_a_sharded_run_equals_one_device(
    tiny_prior_run, tmp_path
):
    from clipgen import build

    config = _operator_config(tiny_prior_run)
    stage = operator_stage.make_stage(config)
    prior = build.restore(tiny_prior_run).params
    start = _initial_params(config, stage)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(prior), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    single = loop.train(config, tmp_path / "one", stage, jax.devices()[:1])
    sharded_config = _operator_config(tiny_prior_run)
    sharded_config.mesh = dict(data=2, fsdp=4, tensor=1)
    sharded = loop.train(
        sharded_config, tmp_path / "eight", operator_stage.make_stage(sharded_config)
    )
    for a, b in zip(
        jax.tree.leaves(_host(single.params)), jax.tree.leaves(_host(sharded.params)), strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)


def test_a_resumed_operator_run_equals_the_uninterrupted_one(tiny_prior_run, tmp_path):
    config = _operator_config(tiny_prior_run, "instruct")
    straight = loop.train(
        config, tmp_path / "straight", operator_stage.make_stage(config), jax.devices()[:1]
    )
    half = _operator_config(tiny_prior_run, "instruct")
    half.total_steps = 2
    loop.train(half, tmp_path / "resumed", operator_stage.make_stage(half), jax.devices()[:1])
    resumed = loop.train(
        config, tmp_path / "resumed", operator_stage.make_stage(config), jax.devices()[:1]
    )
    for part in ("params", "ema", "opt_state"):
        for a, b in zip(
            jax.tree.leaves(_host(getattr(straight, part))),
            jax.tree.leaves(_host(getattr(resumed, part))),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


def test_pipeline_chains_in_memory_and_embedding_files_record_their_space(tiny_prior_run, tmp_path):
    config = _operator_config(tiny_prior_run)
    loop.train(config, tmp_path / "union", operator_stage.make_stage(config), jax.devices()[:1])
    union = operator_pipeline.load_operator(tmp_path / "union")
    rng = np.random.default_rng(0)
    a, b, c = (
        rng.standard_normal((3, config.model.embedding_dim)).astype(np.float32) for _ in range(3)
    )
    out = union([a, b], seed=1)
    assert out.shape == (3, config.model.embedding_dim) and np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(union([a, b], seed=1)), np.asarray(out))  # seeded
    chained = operator_pipeline.run_tree({"union": union}, ("union", ("union", a, b), c), seed=1)
    by_hand = union([union([a, b], seed=2), c], seed=1)
    np.testing.assert_allclose(np.asarray(chained), np.asarray(by_hand), atol=1e-6)
    # The mean baseline is the mean of the normalised inputs, mapped back.
    mean, std = np.asarray(union.params["clip_mean"]), np.asarray(union.params["clip_std"])
    unit = [x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (a, b)]
    expected = ((unit[0] - mean) / std + (unit[1] - mean) / std) / 2 * std + mean
    np.testing.assert_allclose(np.asarray(union.mean_baseline([a, b])), expected, atol=1e-5)
    path = operator_pipeline.save_embeddings(tmp_path / "out.npz", out, operator="union")
    np.testing.assert_array_equal(operator_pipeline.load_embeddings(path), np.asarray(out))
    latents = np.asarray(operators.normalize(np.asarray(out), mean, std))
    np.savez(tmp_path / "latents.npz", embeds=latents, metadata=np.array('{"normalized": true}'))
    with pytest.raises(ValueError, match="normalised latents"):
        operator_pipeline.load_embeddings(tmp_path / "latents.npz")
    back = operator_pipeline.load_embeddings(tmp_path / "latents.npz", union)
    np.testing.assert_allclose(back, np.asarray(out), atol=1e-5)
