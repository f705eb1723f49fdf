"""Public pipeline folders end to end: tiny random Karlo (`UnCLIPPipeline`) and Kandinsky 2.2
prior (`KandinskyV22PriorPipeline`) folders written by diffusers' `save_pretrained`, read by
`clipgen.pipelines.unclip.load_pipeline`, draw what diffusers' own pipelines draw from the
same starting latents and per-step noise; each convention matters; `clipgen sample
--checkpoints KARLO_DIR` writes a grid."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import public_folders  # noqa: E402  (needs torch and diffusers)

from clipgen import cli  # noqa: E402
from clipgen.pipelines import public, unclip  # noqa: E402

CAPTIONS = public_folders.CAPTIONS[:2]
BATCH, DIM, DECODER, SUPER_RES = len(CAPTIONS), 16, 16, 32
PRIOR_STEPS, DECODER_STEPS, SUPER_RES_STEPS = 25, 25, 7  # Karlo's defaults
# Tolerances of the acceptance. The prior's embeddings agree to float32 rounding (3e-6
# measured). The images agree to ~1e-7 per step; end to end the mean over pixels is held
# to 2e-5 (measured 8e-6 for the decoder, 5e-6 after super-resolution). The rare pixels
# whose first x0 estimate is not clipped at t = 999 multiply float32 rounding by
# sqrt(1 / alpha_bar - 1) = 2e4 there (and the decoder's guidance by 8): they are held to
# RARE_MAX (a quarter of a uint8 level in [-1, 1]; measured 1.6e-4), and at most 1% of
# pixels may differ by more than 1e-4 (measured 0.1-0.3%).
PRIOR_TOL, MEAN_TOL, RARE_MAX, RARE_FRACTION = 1e-4, 2e-5, 2e-3, 0.01


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch's two threads crawl on a busy 2-core machine (1.2 s for a tiny UNet call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nhwc(array):
    return np.asarray(array).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    """(diffusers pipeline, its folder, clipgen's cascade read from the folder)."""
    reference, folder = public_folders.karlo_pipeline(tmp_path_factory.mktemp("public"))
    pipe = unclip.load_pipeline(folder)
    return reference, folder, dataclasses.replace(pipe, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def draws(karlo):
    """Each stage's output on both sides from the same starting latents and per-step noise:
    diffusers gets the latents and a torch generator that only its schedulers' steps draw
    from; clipgen gets the latents and those draws, replayed."""
    reference, _, pipe = karlo
    rng = np.random.default_rng(0)
    latents = {
        "prior": rng.standard_normal((BATCH, DIM)).astype(np.float32),
        "decoder": rng.standard_normal((BATCH, 3, DECODER, DECODER)).astype(np.float32),
        "upsampler": rng.standard_normal((BATCH, 3, SUPER_RES, SUPER_RES)).astype(np.float32),
    }
    captured = {}
    post_process, decoder_step = (
        reference.prior.post_process_latents,
        reference.decoder_scheduler.step,
    )

    def prior_output(latents):
        captured["prior"] = post_process(latents).numpy().copy()
        return post_process(latents)

    def decoder_output(*args, **kwargs):
        step = decoder_step(*args, **kwargs)
        captured["decoder"] = step.prev_sample.numpy().clip(-1, 1)  # the pipeline clamps it
        return step

    reference.prior.post_process_latents = prior_output
    reference.decoder_scheduler.step = decoder_output
    try:
        output = reference(
            CAPTIONS,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
            prior_latents=torch.from_numpy(latents["prior"]),
            decoder_latents=torch.from_numpy(latents["decoder"]),
            super_res_latents=torch.from_numpy(latents["upsampler"]),
        )
    finally:
        del reference.prior.post_process_latents, reference.decoder_scheduler.step
    shapes = {
        "prior": (BATCH, DIM),
        "decoder": (BATCH, 3, DECODER, DECODER),
        "upsampler": (BATCH, 3, SUPER_RES, SUPER_RES),
    }
    steps = {"prior": PRIOR_STEPS, "decoder": DECODER_STEPS, "upsampler": SUPER_RES_STEPS}
    noise, draws = (
        {},
        iter(
            public_folders.torch_noise(
                5, [shapes[name] for name in steps for _ in range(steps[name] - 1)]
            )
        ),
    )
    for name in steps:  # the last step of each stage adds no noise and draws none
        rows = np.stack([next(draws) for _ in range(steps[name] - 1)])
        noise[name] = rows if name == "prior" else rows.transpose(0, 1, 3, 4, 2)
    given = {name: a if a.ndim == 2 else _nhwc(a) for name, a in latents.items()}
    stages = pipe.stages(CAPTIONS, latents=given, noise=noise)
    return {
        "diffusers": {**captured, "final": output.images},
        "clipgen": {
            "prior": np.asarray(stages.image_embed),
            "decoder": np.asarray(stages.images[0]),
            "final": np.clip(np.asarray(stages.images[1]) * 0.5 + 0.5, 0.0, 1.0),
        },
        "latents": given,
        "noise": noise,
        "text": stages.text,
        "decoder_images": stages.images[0],
    }


def test_karlo_folder_reads_with_karlo_conventions(karlo):
    reference, _, pipe = karlo
    sampling = pipe.sampling
    assert sampling.embed_norm == "raw"
    prior, decoder, super_res = (sampling[n] for n in ("prior", "decoder", "upsampler"))
    assert (prior.respacing, prior.guidance, prior.clip) == ("unclip25", 4.0, 5.0)
    assert (decoder.respacing, decoder.guidance, decoder.clip) == ("unclip25", 8.0, 1.0)
    assert (super_res.respacing, super_res.guidance, super_res.clip) == ("unclip7", 1.0, 1.0)
    assert prior.guidance_null == decoder.guidance_null == "empty_caption"
    assert pipe.prior.diffusion.prediction == "x0"
    assert pipe.decoder.diffusion.variance == "learned_range"
    assert {pipe.prior.diffusion.arithmetic, pipe.decoder.diffusion.arithmetic} == {"float32"}
    assert (pipe.decoder.resolution, pipe.resolution) == (DECODER, SUPER_RES)
    (stage,) = pipe.upsamplers
    first, last = (jax.tree.leaves(p)[0] for p in (stage.params, stage.last_step_params))
    assert first.shape == last.shape and not np.allclose(first, last)
    texts = [*CAPTIONS, "", "a photo of a cat!"]
    expected = reference.tokenizer(texts, padding="max_length", max_length=77, truncation=True)
    ids, mask = pipe.clip.tokenizer.encode(texts)
    np.testing.assert_array_equal(ids, np.asarray(expected["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(expected["attention_mask"]))


def _assert_images_close(ours, theirs, name):
    difference = np.abs(ours - theirs)
    assert difference.mean() < MEAN_TOL, (name, difference.mean())
    assert difference.max() < RARE_MAX, (name, difference.max())
    assert np.mean(difference > 1e-4) < RARE_FRACTION, (name, np.mean(difference > 1e-4))


def test_karlo_cascade_draws_what_the_diffusers_pipeline_draws(draws):
    theirs, ours = draws["diffusers"], draws["clipgen"]
    np.testing.assert_allclose(ours["prior"], theirs["prior"], atol=PRIOR_TOL, rtol=0)
    _assert_images_close(ours["decoder"], _nhwc(theirs["decoder"]), "decoder")
    _assert_images_close(ours["final"], theirs["final"], "super-resolution")
    # the draws are pictures, not their starting noise
    assert np.abs(ours["decoder"] - np.clip(draws["latents"]["decoder"], -1, 1)).mean() > 0.1
    assert ours["final"].std() > 0.05


def test_each_karlo_convention_changes_the_draw(karlo, draws):
    """clipgen's own conventions in place of Karlo's, one at a time, move the draw far
    outside the tolerances: L2-normalised embeddings, the dropped-text guidance null, and
    super-resolution without `super_res_last`."""
    _, _, pipe = karlo
    theirs = draws["diffusers"]
    prior_inputs = {"x_T": draws["latents"]["prior"], "noise": draws["noise"]["prior"]}
    for change in ({"embed_norm": "l2"}, {"prior_guidance_null": "dropped"}):
        sampling = pipe.sampling.replace(**change)
        text = pipe.encode_text(CAPTIONS, sampling)
        embeds = np.asarray(pipe.sample_prior(text, 0, sampling, **prior_inputs))
        assert np.abs(embeds - theirs["prior"]).max() > 1e-2, change

    (stage,) = pipe.upsamplers
    first_only = unclip.from_params(
        clip=pipe.clip,
        prior=pipe.prior,
        decoder=pipe.decoder,
        upsamplers=[dataclasses.replace(stage, last_step_params=None)],
        sampling=pipe.sampling,
        devices=pipe.devices,
    )
    explicit = {name: {"upsampler": draws[name]["upsampler"]} for name in ("latents", "noise")}
    (upsampled,) = first_only.upsample(draws["decoder_images"], 0, pipe.sampling, **explicit)
    final = np.clip(np.asarray(upsampled) * 0.5 + 0.5, 0.0, 1.0)
    assert np.abs(final - theirs["final"]).mean() > 20 * MEAN_TOL  # measured 1.9e-3


def test_kandinsky_prior_pipeline_draws_its_image_and_negative_embeddings(tmp_path):
    reference, folder = public_folders.kandinsky_prior_pipeline(tmp_path, dim=20)
    captions = public_folders.CAPTIONS[:3]
    latents = np.random.default_rng(1).standard_normal((3, 20)).astype(np.float32)
    expected = reference(
        captions, generator=torch.Generator().manual_seed(3), latents=torch.from_numpy(latents)
    )
    noise = np.stack(public_folders.torch_noise(3, [(3, 20)] * 24))
    pipe = unclip.load_pipeline(folder)
    assert pipe.decoder is None and pipe.sampling.embed_norm == "raw"
    assert pipe.sampling["prior"].guidance_null == "empty_caption"
    stages = pipe.stages(captions, latents={"prior": latents}, noise={"prior": noise})
    assert stages.images == ()
    embeds = expected.image_embeds.numpy()
    np.testing.assert_allclose(np.asarray(stages.image_embed), embeds, atol=PRIOR_TOL, rtol=0)
    assert np.abs(embeds - expected.negative_image_embeds.numpy()).max() > 0.1
    np.testing.assert_allclose(
        np.asarray(public.zero_image_embed(pipe.clip, 3)),
        expected.negative_image_embeds.numpy(),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="prior-only"):
        pipe.generate(captions)
    with pytest.raises(ValueError, match="decoder"):
        pipe.stages(captions, latents={"decoder": latents})


def test_clipgen_sample_writes_a_grid_from_a_karlo_folder(karlo, tmp_path):
    _, folder, _ = karlo
    out = tmp_path / "karlo.png"
    steps = ["--prior-steps", "unclip4", "--decoder-steps", "unclip4"]
    steps += ["--upsampler-steps", "unclip3"]
    argv = ["sample", "--checkpoints", str(folder), "--out", str(out), *steps]
    assert cli.main([*argv, "--captions", *CAPTIONS]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.ndim == 3 and grid.shape[0] > SUPER_RES and grid.std() > 0
