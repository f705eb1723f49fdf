"""The demo job end to end: every stage of the cascade on a tiny shapes build, and `clipgen
sample` on the runs it trained."""

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image

from clipgen import cli, demo
from clipgen.data import shapes_tfds
from clipgen.errors import InputError
from clipgen.eval import run

GRIDS = ("samples.png", "variations.png", "interpolation.png", "textdiff.png", "edit.png")


def test_demo_trains_every_stage_and_writes_grids_and_a_report(tmp_path, capsys):
    data = shapes_tfds.ShapesConfig(
        name="demo_test",
        resolutions=(16, 32),
        num_examples={"train": 4, "test": 6, "heldout": 6},
    )
    report = demo.run(tmp_path, data, preset="tiny", minutes=None)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "shapes_16.png").exists() and (tmp_path / "shapes_32.png").exists()
    assert report["data"] == {"test": 6, "heldout": 6}
    assert report["oracle_true_renders"]["test_32px"]["whole"] == 1.0
    assert "16px" not in " ".join(report["oracle_true_renders"])  # it reads 32 px and up
    configs = demo.cascade_configs(tmp_path, "tiny", None)
    for spec in demo.PLAN:
        assert report["stages"][spec.name]["steps"] == configs[spec.name].total_steps
        assert report["minutes"][spec.name] >= 0
        assert report["stages"][spec.name]["planned_pace"] == 1.0  # no deadlines, no pace
    assert set(report["stages"]["clip"]["scores"]) >= {"test/text_to_image_top1"}
    assert {"test/psnr", "test/bicubic_psnr"} <= set(report["stages"]["upsampler2"]["scores"])
    oracle = report["scores"]["oracle"]
    assert {"test/all/whole", "heldout/all/whole", "test/all/colour"} <= set(oracle)
    assert all(0.0 <= value <= 1.0 for value in oracle.values())
    assert set(report["scores"]["clip_score"]) == {"clip_score", "clip_fd"}
    assert "skipped" in report["scores"]["fid"]  # no Inception weights offline
    for name in GRIDS:
        grid = np.asarray(Image.open(tmp_path / name))
        assert grid.ndim == 3 and grid.std() > 0, name
    edits = report["edit"]
    for name in ("red->blue", "circle->square"):
        assert {"heldout/applied", "heldout/kept", "heldout/directional_cosine"} <= set(
            edits[name]["scores"]
        )
    assert len(edits["gamma_sweep"]["directional_cosine"]) == 5
    assert {"applied", "kept", "both"} <= set(edits["combination"])
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    samples = report["grids"]["samples.png"]
    assert samples == str(tmp_path / "samples.png")
    _clipgen_sample_draws_from_the_trained_runs(tmp_path, capsys)


def _clipgen_sample_draws_from_the_trained_runs(workdir, capsys):
    """`clipgen sample` and the evaluation's generator hook on the demo's trained runs."""
    captions = ["a red circle", "a blue square on the left", "a red triangle beside a circle"]
    out = workdir / "grid.png"
    argv = ["sample", "--checkpoints", str(workdir), "--out", str(out), "--seed", "1"]
    assert cli.main([*argv, "--captions", *captions]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.ndim == 3 and grid.shape[0] > 32 and grid.std() > 0
    settings = {"type": "unclip", "workdir": str(workdir), "resolution": 48, "sampling": {}}
    generate = run.unclip_generator(ml_collections.ConfigDict({"generator": settings}))
    pictures = generate(captions, 1)
    assert pictures.shape == (3, 48, 48, 3) and pictures.dtype == np.uint8
    missing = ["sample", "--checkpoints", str(workdir / "none"), "--out", str(out)]
    assert cli.main([*missing, "--captions", "a red circle"]) == 2
    assert "clipgen train" in capsys.readouterr().err


def test_machine_names_the_cpu_and_its_vector_instructions():
    processor = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f aes\n"
    cpuinfo = processor + "\n" + processor.replace("7B13", "other")
    machine = demo.machine(cpuinfo)
    assert machine["cpu"] == "AMD EPYC 7B13"  # the first processor's, once
    assert machine["vector_instructions"] == ["avx", "avx2", "avx512f", "fma", "sse4_2"]
    assert demo.machine("")["vector_instructions"] == []


def test_a_run_compiles_a_program_once_in_a_private_cache_it_removes(tmp_path, monkeypatch):
    """With no cache of the user's, a program the run compiles twice (two jits of one
    function) is read back the second time, from a temporary folder gone after the run;
    a cache the user set is used and kept."""
    events = []

    def listen(event, **kwargs):
        events.append(event)

    def compile_twice():
        for _ in range(2):
            jax.jit(lambda x: jnp.sin(x) * 1.25).lower(jnp.ones(3)).compile()

    suite_cache = jax.config.jax_compilation_cache_dir
    suite_threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    jax.monitoring.register_event_listener(listen)
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_compilation_cache_dir", None)
        with demo._compile_once():
            [folder] = (tmp_path / "temp").iterdir()
            compile_twice()
            assert any(folder.iterdir())
        assert events.count("/jax/compilation_cache/cache_hits") == 1
        assert jax.config.jax_compilation_cache_dir is None
        assert not any((tmp_path / "temp").iterdir())
        mine = str(tmp_path / "mine")
        jax.config.update("jax_compilation_cache_dir", mine)
        compilation_cache.reset_cache()
        with demo._compile_once():
            compile_twice()
        assert jax.config.jax_compilation_cache_dir == mine and any(Path(mine).iterdir())
    finally:
        jax.monitoring.unregister_event_listener(listen)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", suite_threshold)
        jax.config.update("jax_compilation_cache_dir", suite_cache)
        compilation_cache.reset_cache()


def test_cascade_configs_chain_the_stages_and_fit_the_budget(tmp_path):
    configs = demo.cascade_configs(tmp_path, "demo", 30.0)
    clip, prior, decoder = configs["clip"], configs["prior"], configs["decoder"]
    assert prior.model.embedding_dim == decoder.model.clip_embed_dim == clip.model.projection_dim
    assert prior.model.num_text_tokens == decoder.model.num_text_tokens == 24
    assert prior.data.embeddings == decoder.data.embeddings == str(tmp_path / "embeddings")
    assert decoder.data.clip_workdir == str(tmp_path / "clip")
    sizes = [configs[name].data.resolution for name in ("decoder", "upsampler", "upsampler2")]
    assert sizes == [16, 32, 64]
    planned_minutes = 0.0
    for spec in demo.PLAN:
        plan = spec.demo
        steps = configs[spec.name].total_steps
        minutes = steps / plan.steps_per_minute + plan.setup_minutes
        assert steps == demo.planned_steps(spec, 30.0)
        assert minutes <= plan.share * (30.0 - demo.RESERVED_MINUTES) + 1 / plan.steps_per_minute
        planned_minutes += minutes
    assert planned_minutes + demo.RESERVED_MINUTES <= 30.0
    longer = demo.cascade_configs(tmp_path, "demo", 60.0)
    assert longer["decoder"].total_steps > decoder.total_steps
    assert sum(spec.demo.share for spec in demo.PLAN) == pytest.approx(1.0)


@pytest.mark.parametrize("minutes", [15.0, 30.0, 60.0])
def test_stage_deadlines_keep_time_for_later_stages(minutes):
    """On schedule no stage is stopped before its planned training ends; however late it
    starts, it stops within 1.1x its share and leaves its own set-up (its evaluation) and
    each later stage its set-up plus half its training time."""
    seconds = 60.0 * demo.training_minutes(minutes)
    end, start = seconds, 0.0

    def setup(spec):
        return 60.0 * spec.demo.setup_minutes

    for index, spec in enumerate(demo.PLAN):
        share = spec.demo.share * seconds
        later = demo.PLAN[index + 1 :]
        kept = setup(spec) + sum(
            setup(s) + 0.5 * (s.demo.share * seconds - setup(s)) for s in later
        )
        on_time = demo.stage_deadline(index, start, end, seconds)
        assert on_time >= start + share - setup(spec) - 1e-9
        for late in (start, start + 100.0, end - 1.0, end + 50.0):
            deadline = demo.stage_deadline(index, late, end, seconds)
            assert deadline <= late + 1.1 * share + 1e-9
            assert end - deadline >= kept - 1e-9
        start += share


def test_a_budget_too_small_for_every_stage_is_refused(tmp_path):
    smallest = demo.minimum_budget_minutes()
    for spec in demo.PLAN:
        plan = spec.demo
        unclamped = plan.share * demo.training_minutes(smallest) - plan.setup_minutes
        assert unclamped * plan.steps_per_minute >= demo.MIN_STEPS - 1e-6
    starved = [
        spec.name
        for spec in demo.PLAN
        if (spec.demo.share * demo.training_minutes(smallest - 0.5) - spec.demo.setup_minutes)
        * spec.demo.steps_per_minute
        < demo.MIN_STEPS
    ]
    assert starved  # the bound is tight: half a minute less starves a stage
    with pytest.raises(InputError, match="--minutes 10: a budgeted demo needs at least"):
        demo.run(tmp_path / "run", minutes=10.0, budget=True)
    assert not (tmp_path / "run").exists()


def test_step_timer_leaves_out_the_first_step_and_sets_a_slower_pace():
    times = iter([100.0, 101.0, 101.5, *(101.5 + 0.5 * k for k in range(1, 40))])
    timer = demo.StepTimer(clock=lambda: next(times))
    timer(1)  # after compiling: the clock starts here
    for step in range(2, 2 + demo.MIN_TIMED_STEPS - 1):
        timer(step)
    assert timer.steps_per_minute is None  # too few steps timed
    timer(1 + demo.MIN_TIMED_STEPS)
    elapsed = 1.0 + 0.5 * (demo.MIN_TIMED_STEPS - 1)
    assert timer.steps_per_minute == pytest.approx(60.0 * demo.MIN_TIMED_STEPS / elapsed)
    plan = demo.PLAN[2]
    full = demo.planned_steps(plan, 30.0)
    assert demo.planned_steps(plan, 30.0, pace=0.5) == pytest.approx(full / 2, abs=1)
    assert demo.planned_steps(plan, 30.0, pace=0.0) == demo.MIN_STEPS


def test_progress_estimates_the_rest_of_the_run_at_the_measured_pace():
    steps = {spec.name: 100 + 10 * i for i, spec in enumerate(demo.PLAN)}
    progress = demo.Progress(steps)
    first = demo.PLAN[0]
    speed = first.demo.steps_per_minute / 2  # this machine runs at half the planned speed
    later = sum(
        steps[spec.name] / (spec.demo.steps_per_minute / 2) + spec.demo.setup_minutes
        for spec in demo.PLAN[1:]
    )
    expected = (steps[first.name] - 40) / speed + later + demo.RESERVED_MINUTES
    assert progress.minutes_left(0, 40, speed) == pytest.approx(expected)
    planned = sum(
        steps[spec.name] / spec.demo.steps_per_minute + spec.demo.setup_minutes
        for spec in demo.PLAN[1:]
    )
    unmeasured = (steps[first.name] - 40) / first.demo.steps_per_minute + planned
    assert progress.minutes_left(0, 40, None) == pytest.approx(unmeasured + demo.RESERVED_MINUTES)
