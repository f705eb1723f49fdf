"""`clipgen demo`: the main job on one CPU, the whole unCLIP cascade on the shapes world,
then the pOps operators fine-tuned from its prior and DiffusionCLIP edits of its decoder.

It builds the shapes dataset through its tfds builder (grids of the true renders, the
oracle scored on them), then trains CLIP, the diffusion prior, the decoder and both
upsamplers with their `demo` presets, one after the other, the union and recolour
operators (clipgen.demo.operators) and two DiffusionCLIP edits of the decoder
(clipgen.demo.edit). By default the stages train a fixed plan of steps: those a
PLAN_MINUTES run buys at the speeds measured on an idle 2-core CPU (clipgen.stages), so
the report is the same on any machine with the same instruction sets for the same seed (on
others XLA:CPU rounds differently) and a slower machine only takes longer (the log gives
the whole run's ETA as it goes). With `budget` the plan is a budget of `minutes` instead:
what the data set, the scoring and the grids take (RESERVED_MINUTES) is set aside, each
stage trains for the steps its share of the rest buys at its measured speed, slowed to the
pace the stage before it kept on this machine if that was slower, and stops at its
deadline. Stages already trained in the workdir resume. It scores the cascade
with the `shapes` evaluation (oracle accuracies on test and held-out captions, CLIP score,
CLIP-space Frechet distance), draws `samples.png` (test captions under their images), the
variation, interpolation, text-diff, operator and edit grids, and writes `report.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_collections
from jax.experimental.compilation_cache import compilation_cache

import clipgen
from clipgen import config as config_lib
from clipgen import images, stages, train
from clipgen.data import shapes, shapes_tfds
from clipgen.data.files import atomic_write
from clipgen.data.pipeline import ProceduralShapes
from clipgen.demo import edit as demo_edit
from clipgen.demo import operators as demo_operators
from clipgen.errors import InputError
from clipgen.eval import oracle, registry
from clipgen.pipelines import embed
from clipgen.stages import StageSpec

DEMO_DATA = shapes_tfds.ShapesConfig(
    name="demo",
    description="The demo cascade's resolutions.",
    resolutions=(16, 32, 64, 256),
    num_examples={"train": 2000, "test": 200, "heldout": 200},
)
# What is not a stage: building the data set, the cascade's scoring and the grids took 3.1
# min of a 30-minute run (report.json "minutes"; the CLIP score reusing the oracle's images).
RESERVED_MINUTES = 3.5
PLAN_MINUTES = 30.0  # the default run's fixed plan: the steps of a 30-minute run
MIN_STEPS = 50
MIN_TIMED_STEPS = 20  # a stage's measured speed sets the pace only over this many steps
VECTOR_FLAGS = ("avx", "fma", "amx", "sse4")  # /proc/cpuinfo flags report.json records


PLAN = stages.demo_stages()  # the stages in order, each with its DemoPlan
# Stage evaluations after training, cut to what the budget affords.
EVAL_EXAMPLES = {"clip": 500, "prior": 200, "decoder": 64, "upsampler": 32}
SCORED_CAPTIONS = 64  # per split, for the cascade's oracle and CLIP score
EMBEDDED_TRAIN_EXAMPLES = 10_000  # train-split embeddings for the prior and the decoder


def cascade_configs(
    workdir: str | Path, preset: str = "demo", minutes: float | None = None
) -> dict[str, ml_collections.ConfigDict]:
    """The stage configs of the demo cascade in `workdir`, by run name: each stage's
    `preset`, made consistent with each other (the prior's and decoder's widths from the
    CLIP, each upsampler's resolution from the stage before, one set of embedding shards),
    and sized to a run of `minutes` (None: the presets' own step counts)."""
    workdir = Path(workdir)
    configs = {spec.name: spec.config(preset) for spec in PLAN}
    [clip], [prior], [decoder] = (
        [configs[spec.name] for spec in PLAN if spec.role == role]
        for role in ("clip", "prior", "decoder")
    )
    dim, width = clip.model.projection_dim, clip.model.text.width
    length = clip.data.context_length
    prior.model.update(embedding_dim=dim, text_token_dim=width, num_text_tokens=length)
    decoder.model.update(clip_embed_dim=dim, text_width=width, num_text_tokens=length)
    embedded = prior.data.num_examples.to_dict()
    if minutes is not None:
        embedded["train"] = min(embedded["train"], EMBEDDED_TRAIN_EXAMPLES)
    for reader in (prior, decoder):
        reader.data.update(
            embeddings=str(workdir / "embeddings"),
            clip_workdir=str(workdir / "clip"),
            clip_preset=preset,
            num_examples=embedded,
        )
    size = decoder.data.resolution
    for spec in PLAN:
        if spec.role == "upsampler":
            data = configs[spec.name].data
            size *= data.scale
            data.update(resolution=size, crop=min(data.crop, size))
    for spec in PLAN:
        config = configs[spec.name]
        config.eval_every = 0
        config.preview_every = 0
        for settings in config.evals.values():
            limit = EVAL_EXAMPLES[spec.config_file]
            settings.num_examples = min(settings.num_examples, limit)
            settings.batch_size = min(settings.batch_size, settings.num_examples)
        if minutes is not None:
            _set_steps(config, planned_steps(spec, minutes))
    return configs


def _set_steps(config: ml_collections.ConfigDict, steps: int) -> None:
    config.total_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)


def training_minutes(minutes: float) -> float:
    """The minutes of a `minutes` run left to train in."""
    return max(minutes - RESERVED_MINUTES, 0.0)


def planned_steps(spec: StageSpec, minutes: float, pace: float = 1.0) -> int:
    """The steps a stage's share of a `minutes` run buys at its measured speed times `pace`
    (this machine's speed relative to the one the plan was measured on)."""
    plan = spec.demo
    stage_minutes = plan.share * training_minutes(minutes) - plan.setup_minutes
    return max(MIN_STEPS, int(stage_minutes * plan.steps_per_minute * pace))


class StepTimer:
    """A training-loop hook that measures a stage's steps per minute from its first step's
    end on, so compiling the step is left out (loading, checkpoints and logging are in)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._first: tuple[int, float] | None = None
        self._last: tuple[int, float] | None = None

    def __call__(self, step: int) -> None:
        now = (step, self._clock())
        self._first = self._first or now
        self._last = now

    @property
    def steps_per_minute(self) -> float | None:
        """None until MIN_TIMED_STEPS steps after the first were timed."""
        if self._first is None or self._last[0] - self._first[0] < MIN_TIMED_STEPS:
            return None
        return 60.0 * (self._last[0] - self._first[0]) / (self._last[1] - self._first[1])


class Progress:
    """The whole run's progress and ETA, logged as the stages train: a stage's hook logs at
    most every `every` seconds, estimating its own rest at its measured speed and the later
    stages' steps at their planned speeds slowed to the pace this one keeps."""

    def __init__(self, steps: dict[str, int], every: float = 60.0, clock=time.perf_counter):
        self.steps, self.every, self.clock = steps, every, clock
        self._logged = clock()

    def hook(self, index: int, timer: StepTimer) -> Callable[[int], None]:
        def log(step: int) -> None:
            if self.clock() - self._logged < self.every:
                return
            self._logged = self.clock()
            logging.info(
                "demo: %s step %d of %d; the whole run ends in about %.0f min",
                PLAN[index].name,
                step,
                self.steps[PLAN[index].name],
                self.minutes_left(index, step, timer.steps_per_minute),
            )

        return log

    def minutes_left(self, index: int, step: int, speed: float | None) -> float:
        """Minutes to the end of the run from `step` of stage `index` trained at `speed`."""
        spec = PLAN[index]
        pace = min(1.0, speed / spec.demo.steps_per_minute) if speed else 1.0
        left = (self.steps[spec.name] - step) / (speed or spec.demo.steps_per_minute)
        for later in PLAN[index + 1 :]:
            plan = later.demo
            left += self.steps[later.name] / (plan.steps_per_minute * pace) + plan.setup_minutes
        return left + RESERVED_MINUTES


def minimum_budget_minutes() -> float:
    """The smallest budget in which every stage's share buys its set-up and MIN_STEPS steps
    at its measured speed (a smaller one would leave a stage, the last upsampler first, a
    single step)."""
    stage_minutes = (
        (spec.demo.setup_minutes + MIN_STEPS / spec.demo.steps_per_minute) / spec.demo.share
        for spec in PLAN
    )
    return max(stage_minutes) + RESERVED_MINUTES


def stage_deadline(index: int, now: float, training_end: float, training_seconds: float) -> float:
    """When stage `PLAN[index]`, starting at `now`, must stop training: after 1.1 times its
    share of the training seconds, and soon enough to leave its own set-up minutes (its
    evaluation after training, conservatively) and each later stage its set-up plus half its
    training time (an overrun would otherwise leave the upsamplers a single step each: a
    15-minute budget did when later stages kept half their shares, set-up included)."""

    def setup(spec: StageSpec) -> float:
        return 60.0 * spec.demo.setup_minutes

    def kept_for(spec: StageSpec) -> float:
        return setup(spec) + 0.5 * max(spec.demo.share * training_seconds - setup(spec), 0.0)

    spec = PLAN[index]
    own_end = now + 1.1 * spec.demo.share * training_seconds
    later = sum(kept_for(later_spec) for later_spec in PLAN[index + 1 :])
    return min(own_end, training_end - setup(spec) - later)


def run(
    workdir: str | Path,
    data: shapes_tfds.ShapesConfig = DEMO_DATA,
    preset: str = "demo",
    minutes: float | None = PLAN_MINUTES,
    budget: bool = False,
) -> dict:
    """Run the demo in `workdir` with each stage's `preset`: the fixed plan of the steps a
    `minutes` run buys at the measured speeds (None: each preset's own steps), or with
    `budget` a plan fitted to this machine within `minutes`; returns the report also
    written to report.json. In a budget a stage plans its steps at the pace of the stage
    before it when that trained slower than its plan, so its schedule still ends within
    its share; an overrunning stage takes its time from the stages after it, not from the
    budget, but leaves each of them its set-up and half its training time (stage_deadline);
    a budget below minimum_budget_minutes() is refused."""
    if budget and minutes is None:
        raise ValueError("a budgeted demo needs its minutes")
    if budget and minutes < minimum_budget_minutes():
        raise InputError(
            f"--minutes {minutes:g}: a budgeted demo needs at least "
            f"{math.ceil(minimum_budget_minutes())} minutes on a 2-core CPU (each stage's "
            f"share must buy its set-up and {MIN_STEPS} steps); give more minutes, or leave "
            "--minutes out for the fixed plan of a 30-minute run"
        )
    with _compile_once():
        return _run(Path(workdir), data, preset, minutes, budget)


@contextlib.contextmanager
def _compile_once() -> Iterator[None]:
    """A persistent compilation cache for the run, unless the user set one
    (JAX_COMPILATION_CACHE_DIR or jax.config), so that a program compiled again later in the
    run (the second edit's training step, each operator's renders) is read back, not
    compiled: in a private temporary folder removed at the end, since a compilation cache
    is code that runs, and one left behind could be read on a CPU with other instructions."""
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="clipgen-demo-compiled-") as folder:
        compilation_cache.set_cache_dir(folder)
        compilation_cache.reset_cache()
        try:
            yield
        finally:
            compilation_cache.set_cache_dir(None)
            compilation_cache.reset_cache()


def _run(
    workdir: Path, data: shapes_tfds.ShapesConfig, preset: str, minutes: float | None, budget: bool
) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    plan = "budget" if budget else ("fixed" if minutes else "presets")
    report: dict = {"plan": plan, "plan_minutes": minutes}
    report["minutes"] = {}
    report.update(_true_renders(workdir, data))
    report["minutes"]["data"] = _minutes_since(started)
    configs = cascade_configs(workdir, preset, minutes)
    report["stages"] = {}
    if budget:
        training_seconds = 60 * training_minutes(minutes)
        training_end = time.time() + training_seconds
    pace = 1.0
    progress = Progress({spec.name: configs[spec.name].total_steps for spec in PLAN})
    for index, spec in enumerate(PLAN):
        stage_started = time.perf_counter()
        config, deadline = configs[spec.name], None
        if budget:
            deadline = stage_deadline(index, time.time(), training_end, training_seconds)
            _set_steps(config, planned_steps(spec, minutes, pace))
            progress.steps[spec.name] = config.total_steps
        timer = StepTimer()
        hooks = [timer, progress.hook(index, timer)]
        result = _train_stage(spec, config, workdir, deadline, hooks)
        speed = timer.steps_per_minute
        result.update(planned_pace=round(pace, 3), steps_per_minute=speed and round(speed, 1))
        if speed is not None and budget:
            pace = min(1.0, speed / spec.demo.steps_per_minute)
        report["stages"][spec.name] = result
        report["minutes"][spec.name] = _minutes_since(stage_started)
    scoring_started = time.perf_counter()
    report["scores"] = _score_cascade(workdir, preset)
    report["minutes"]["scoring"] = _minutes_since(scoring_started)
    grids_started = time.perf_counter()
    report["grids"] = _draw_grids(workdir, preset)
    report["minutes"]["grids"] = _minutes_since(grids_started)
    operators_started = time.perf_counter()
    report["operators"] = demo_operators.run(workdir, preset, configs["prior"])
    report["grids"]["operators.png"] = report["operators"].pop("grid")
    report["minutes"]["operators"] = _minutes_since(operators_started)
    edit_started = time.perf_counter()
    report["edit"] = demo_edit.run(workdir, preset, configs["decoder"])
    report["grids"]["edit.png"] = report["edit"].pop("grid")
    report["minutes"]["edit"] = _minutes_since(edit_started)
    report["minutes"]["total"] = _minutes_since(started)
    report["versions"] = _versions()
    report["machine"] = machine()
    encoded = json.dumps(report, indent=2).encode()
    atomic_write(workdir / "report.json", lambda file: file.write(encoded))
    logging.info("demo report: %s", json.dumps(report["scores"]))
    return report


def _true_renders(workdir: Path, data: shapes_tfds.ShapesConfig) -> dict:
    """Build the tfds dataset, draw grids of its test renders at each resolution and score
    the oracle on the renders it can read (32 px and up): the ceiling for the cascade."""
    builder = shapes_tfds.build(str(workdir / "data"), data)
    result: dict = {"data": {}, "oracle_true_renders": {}}
    for split in ("test", "heldout"):
        source = builder.as_data_source(split)
        examples = [source[i] for i in range(len(source))]
        result["data"][split] = len(examples)
        scenes = [shapes.scene_from_json(example["scene"]) for example in examples]
        for resolution in data.resolutions:
            key = shapes_tfds.image_feature_name(resolution)
            pictures = [example[key] for example in examples]
            if split == "test":
                captions = [shapes.caption(scene) for scene in scenes[:16]]
                images.save_png(
                    workdir / f"shapes_{resolution}.png",
                    images.grid(pictures[:16], captions, columns=4, cell=128),
                )
            if resolution >= oracle.MIN_RESOLUTION:
                accuracy = oracle.mean_accuracy(oracle.read(pictures, scenes))
                result["oracle_true_renders"][f"{split}_{resolution}px"] = accuracy
    return result


def _train_stage(
    spec: StageSpec,
    config: ml_collections.ConfigDict,
    workdir: Path,
    deadline: float | None,
    hooks: list[Callable[[int], None]],
) -> dict:
    """Train (or resume) one stage in workdir/<name> with the loop `hooks` (its embedding
    shards written first if it reads them), then score it with its evaluators."""
    from clipgen.train import loop

    embed.ensure_embeddings(config)
    stage = train.trainer(spec.trainer).make_stage(config)
    train_started = time.perf_counter()
    state = loop.train(config, workdir / spec.name, stage, deadline=deadline, hooks=hooks)
    result = {
        "steps": int(state.step),
        "planned_steps": int(config.total_steps),
        "training_minutes": _minutes_since(train_started),
    }
    scores = {}
    for evaluate in registry.training_evaluators(config).values():
        scores.update({key: float(value) for key, value in evaluate(state).items()})
    if scores:
        result["scores"] = scores
    return result


def _score_cascade(workdir: Path, preset: str) -> dict:
    """The `shapes` evaluation (configs/eval.py) of the cascade trained in `workdir`."""
    from clipgen.eval import run as eval_run

    config = config_lib.load_preset("eval", "shapes")
    config.demo_workdir = str(workdir)
    config.generator.preset = preset
    config.generator.resolution = 0
    count = SCORED_CAPTIONS if preset == "demo" else 8
    config.evals.oracle.update(count=count, batch_size=count)
    config.evals.clip_score.captions.count = count
    config.evals.clip_score.batch_size = count
    config.evals.clip_score.clip.preset = preset
    report = eval_run.evaluate(config, workdir / "eval")
    return {
        name: result.get("metrics", {"skipped": result.get("skipped")})
        for name, result in report["evals"].items()
    }


def _draw_grids(workdir: Path, preset: str) -> dict[str, str]:
    """samples.png (the first 16 test captions), variations.png, interpolation.png and
    textdiff.png, drawn by the trained cascade."""
    from clipgen.pipelines import manipulate, unclip

    pipe = unclip.load_pipeline({"workdir": str(workdir), "preset": preset})
    test = ProceduralShapes((pipe.resolution,), "test", 0)
    examples = [test[i] for i in range(16)]
    captions = [example["caption"] for example in examples]
    real = [example[f"image_{pipe.resolution}"] for example in examples]
    grids = {}

    def save(name: str, pictures, labels, columns: int) -> None:
        grid = images.grid(list(pictures), list(labels), columns=columns, cell=128)
        grids[name] = str(images.save_png(workdir / name, grid))

    save("samples.png", pipe.generate(captions, seed=0), captions, 4)
    varied = manipulate.variations(pipe, real[:2], seed=0, eta=1.0, count=3)
    pictures = [image for i in range(2) for image in (real[i], *varied.images[3 * i : 3 * i + 3])]
    labels = ["input", "eta=1", "eta=1", "eta=1"] * 2
    save("variations.png", pictures, labels, 4)
    path = manipulate.interpolate(pipe, real[0], real[1], num=6, seed=0)
    save("interpolation.png", [real[0], *path.images, real[1]], ["a", *path.labels, "b"], 8)
    edited = _recoloured(captions[0])
    diff = manipulate.text_diff(
        pipe, real[0], captions[0], edited, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], seed=0
    )
    save("textdiff.png", [real[0], *diff.images], [f"-> {edited}", *diff.labels], 7)
    return grids


def _recoloured(caption: str) -> str:
    """`caption` with its first colour word changed to another colour (the text diff's
    target)."""
    words = caption.split()
    colours = list(shapes.COLOURS)
    for i, word in enumerate(words):
        if word in colours:
            words[i] = colours[(colours.index(word) + len(colours) // 2) % len(colours)]
            return " ".join(words)
    return caption


def _minutes_since(start: float) -> float:
    return round((time.perf_counter() - start) / 60, 2)


def machine(cpuinfo: str | None = None) -> dict:
    """The CPU the run trained on: its model, cores and the vector instruction sets XLA:CPU
    picks its kernels by, since two machines with other sets may round differently and
    so not give the same report for the same seed. `cpuinfo` is /proc/cpuinfo's text."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    vector = sorted(flag for flag in flags if flag.startswith(VECTOR_FLAGS))
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "vector_instructions": vector,
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets")
    versions = {"clipgen": clipgen.__version__, "python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
