"""The one training loop every stage shares.

A stage supplies only what is particular to it (a `Stage`: its parameters, its batches and
its loss, optionally a sampling preview); the loop owns the mesh, the sharded state, the
compiled step, checkpoints, metrics, pre-emption and non-finite handling. Evaluations are
handed to `train` by its caller (`clipgen train` and the demo build them from
`config.evals`), so the loop knows nothing of the evaluation layer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from clipgen import parallel
from clipgen.checkpoint import Checkpointer
from clipgen.errors import output_directory
from clipgen.train import state as state_lib

Batch = dict[str, Any]
Evaluate = Callable[[state_lib.TrainState], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a stage gives the loop.

    init_params(rng) -> params, optionally boxed with logical axis names.
    loss(params, batch, rng) -> (scalar loss, dict of scalar metrics); `batch` is global.
    batches(first_batch, global_batch_size) -> this process's slices of consecutive global
        batches, starting at batch number `first_batch` (this is how a run resumes).
    batch_spec(global_batch_size) -> the global batch as ShapeDtypeStructs.
    preview(state) -> images to write ({name: uint8 NHWC}).
    pretrained() -> the parameters to start from (host arrays, the tree init_params makes,
        unboxed), put onto the state's shardings; init_params then only gives their shapes
        and logical axis names (fine-tuning: a converted prior, an operator's adapters).
    frozen: regular expressions over "/"-joined parameter paths the stage never trains,
        beside config.optim.frozen (LoRA's base, the blocks an operator leaves alone).
    constants() -> host arrays the loss reads but nothing trains (a frozen CLIP, LoRA's
        base): placed replicated on the mesh once, kept out of the state (no optimizer
        state, EMA or checkpoint); the loss is then called loss(params, batch, rng,
        constants).
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    loss: Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
    batches: Callable[[int, int], Iterator[Batch]]
    batch_spec: Callable[[int], dict[str, jax.ShapeDtypeStruct]]
    preview: Callable[[state_lib.TrainState], dict[str, np.ndarray]] | None = None
    pretrained: Callable[[], Any] | None = None
    frozen: tuple[str, ...] = ()
    constants: Callable[[], Any] | None = None


class NonFiniteError(RuntimeError):
    """A loss or gradient was not finite and the config says to stop."""


class Preempted(Exception):  # noqa: N818 - a signal, not an error
    """SIGTERM arrived: the current step was saved, or none had been taken yet."""


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    stage: Stage,
    devices: Sequence[jax.Device] | None = None,
    *,
    deadline: float | None = None,
    hooks: Sequence[Callable[[int], None]] = (),
    evaluators: Mapping[str, Evaluate] | None = None,
) -> state_lib.TrainState:
    """Train `stage` for `config.total_steps` steps in `workdir`, resuming from its newest
    checkpoint; the mesh spans `devices` (default: all). With `deadline` (a `time.time()`
    value) it stops early once that has passed, after saving a checkpoint. `hooks` are
    called with the step number after each step, beside the loop's own progress report;
    `evaluators` (name -> evaluate(state) -> scalars) every `config.eval_every` steps. Raises
    `Preempted` after saving when SIGTERM arrives, `NonFiniteError` when a non-finite loss
    or gradient appears and `config.on_nonfinite == "stop"`. SIGTERM is caught from the
    call on: before the first step it stops the run with nothing new to save."""
    workdir = output_directory(workdir)
    stop_signal = _SigtermFlag()
    try:
        return _train(config, workdir, stage, devices, deadline, hooks, evaluators, stop_signal)
    finally:
        stop_signal.restore()


def _train(config, workdir, stage, devices, deadline, hooks, evaluators, stop_signal):
    run = prepare(config, stage, devices)
    mesh, rules, batch_size = run.mesh, run.rules, int(config.batch_size)
    checkpointer = Checkpointer(
        workdir / "checkpoints",
        keep=config.checkpoint.keep,
        keep_every=config.checkpoint.keep_every,
        asynchronous=config.checkpoint.asynchronous,
    )
    restored = checkpointer.restore(run.abstract_state, config)
    if restored is None:
        train_state = run.init_state()
        first_batch = 0
    else:
        train_state = restored.state
        first_batch = int(restored.data["batches"])
        logging.info("resumed from %s at step %d", checkpointer.directory, restored.step)
    step_fn = run.step
    if run.constants is not None:
        step_fn = functools.partial(_with_constants, run.step, run.constants)
    evaluators = dict(evaluators or {})
    writer = _metric_writer(workdir)
    hooks = [*_progress_hooks(config, writer), *hooks]
    start_step = int(jax.device_get(train_state.step))
    batches = stage.batches(first_batch, batch_size)
    window: list[dict[str, jax.Array]] = []

    def save(force: bool = False) -> None:
        data = {"batches": first_batch + step - start_step}
        checkpointer.save(train_state, config, data, stage=stage.name, force=force)

    step = start_step
    try:
        if stop_signal.raised:
            raise Preempted(f"terminated before step {step + 1}; nothing new to save")
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            while step < config.total_steps:
                batch = parallel.global_batch(next(batches), mesh)
                train_state, metrics = step_fn(train_state, batch)
                step += 1
                window.append(metrics)
                for hook in hooks:
                    hook(step)
                last = step == config.total_steps
                out_of_time = deadline is not None and time.time() > deadline and not last
                if step % config.log_every == 0 or last or out_of_time:
                    _write_window(writer, step, window)
                    window = []
                    _check_finite(config, train_state, checkpointer)
                if step % config.checkpoint.every == 0 or last:
                    save()
                if stage.preview and config.preview_every and step % config.preview_every == 0:
                    writer.write_images(step, stage.preview(train_state))
                if config.eval_every and step % config.eval_every == 0:
                    for evaluate in evaluators.values():
                        writer.write_scalars(step, evaluate(train_state))
                if stop_signal.raised or (
                    jax.process_count() > 1 and checkpointer.manager.reached_preemption(step)
                ):
                    save(force=True)
                    checkpointer.wait()
                    raise Preempted(f"pre-empted at step {step}; checkpoint saved")
                if out_of_time:
                    save(force=True)
                    logging.warning(
                        "%s: out of time at step %d of %d; checkpoint saved",
                        stage.name,
                        step,
                        config.total_steps,
                    )
                    break
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.flush()
    return train_state


@dataclasses.dataclass
class Prepared:
    """A stage made ready to train: its mesh, its sharded state's shapes and the compiled
    step (`step(state, global_batch) -> (state, metrics)`)."""

    mesh: jax.sharding.Mesh
    rules: tuple
    abstract_state: state_lib.TrainState
    state_shardings: Any
    step: Any
    compile_seconds: float
    init_state: Callable[[], state_lib.TrainState]
    constants: Any = None


def prepare(
    config: ml_collections.ConfigDict,
    stage: Stage,
    devices: Sequence[jax.Device] | None = None,
    compile_step: bool = True,
) -> Prepared:
    """Mesh, sharded state shapes and the AOT-compiled step; no parameters are made yet
    (`init_state()` makes them, in place on their shards). With `compile_step=False` the
    step is only lowered (`Prepared.step` is a `jax.stages.Lowered`): shapes and shardings
    of paper-scale presets can be checked on fake devices."""
    parallel.initialize_distributed(config)
    mesh = parallel.make_mesh(dict(config.mesh), devices)
    rules = parallel.logical_rules(config)
    tx = state_lib.make_optimizer(config.optim, extra_frozen=stage.frozen)
    ema_decays = tuple(config.optim.ema_decays)

    def init_state(seed, params=None):
        init_rng, state_rng = jax.random.split(jax.random.key(seed))
        params = stage.init_params(init_rng) if params is None else params
        return state_lib.create_state(params, tx, ema_decays, state_rng)

    with nn.logical_axis_rules(rules):
        abstract_state, state_shardings = parallel.abstract_sharded(
            init_state, mesh, rules, config.seed, fsdp_min_size=config.fsdp_min_size
        )

    def make_state() -> state_lib.TrainState:
        if stage.pretrained is None:
            return parallel.init_onto(init_state, mesh, rules, state_shardings, config.seed)
        params = parallel.put_host_tree(stage.pretrained(), state_shardings.params)
        return parallel.init_onto(init_state, mesh, rules, state_shardings, config.seed, params)

    schedule = state_lib.learning_rate_schedule(config.optim)
    constants = None
    if stage.constants is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.P())
        host = stage.constants()
        constants = parallel.put_host_tree(host, jax.tree_util.tree_map(lambda _: replicated, host))
    start = time.perf_counter()
    step = _lower_step(
        stage,
        tx,
        schedule,
        mesh,
        rules,
        state_shardings,
        abstract_state,
        int(config.batch_size),
        constants,
    )
    if compile_step:
        step = step.compile()
    seconds = time.perf_counter() - start
    logging.info(
        "%s the %s train step in %.1f s",
        "compiled" if compile_step else "lowered",
        stage.name,
        seconds,
    )
    return Prepared(
        mesh, rules, abstract_state, state_shardings, step, seconds, make_state, constants
    )


def _lower_step(
    stage, tx, schedule, mesh, rules, state_shardings, abstract_state, batch_size, constants=None
):
    """The train step, jitted with shardings and donated state, lowered for AOT compilation
    (with the stage's constants as a last, replicated argument when it has them)."""

    def train_step(train_state: state_lib.TrainState, batch: Batch, constants=None):
        rng = jax.random.fold_in(train_state.rng, train_state.step)

        def loss_fn(params):
            if constants is None:
                return stage.loss(params, batch, rng)
            return stage.loss(params, batch, rng, constants)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, train_state.opt_state, train_state.params)
        params = optax.apply_updates(train_state.params, updates)
        ema = state_lib.update_ema(train_state.ema, params, train_state.step)

        def keep_if_finite(new, old):
            return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

        first_bad = jnp.where(
            (~finite) & (train_state.first_nonfinite_step < 0),
            train_state.step,
            train_state.first_nonfinite_step,
        )
        new_state = train_state.replace(
            step=train_state.step + 1,
            params=keep_if_finite(params, train_state.params),
            opt_state=keep_if_finite(opt_state, train_state.opt_state),
            ema=keep_if_finite(ema, train_state.ema),
            nonfinite_steps=train_state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=first_bad,
        )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(train_state.step))
        return new_state, metrics

    spec = stage.batch_spec(batch_size)
    batch_shardings = {
        name: parallel.batch_sharding(mesh, len(value.shape)) for name, value in spec.items()
    }
    abstract_batch = {
        name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=batch_shardings[name])
        for name, value in spec.items()
    }
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    in_shardings = (state_shardings, batch_shardings)
    arguments = (abstract_state, abstract_batch)
    if constants is not None:
        in_shardings += (jax.tree_util.tree_map(lambda _: replicated, constants),)
        arguments += (
            jax.tree_util.tree_map(
                lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=replicated), constants
            ),
        )
    jitted = jax.jit(
        train_step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted.lower(*arguments)


def _with_constants(step, constants, train_state, batch):
    return step(train_state, batch, constants)


def _check_finite(config, train_state, checkpointer) -> None:
    first_bad = int(jax.device_get(train_state.first_nonfinite_step))
    if first_bad < 0:
        return
    skipped = int(jax.device_get(train_state.nonfinite_steps))
    if config.on_nonfinite == "skip":
        logging.warning("%d steps skipped so far for a non-finite loss or gradient", skipped)
        return
    checkpointer.wait()
    last_good = checkpointer.latest_step()
    where = (
        f"{checkpointer.directory / str(last_good)} (step {last_good})"
        if last_good is not None
        else "none yet"
    )
    raise NonFiniteError(
        f"non-finite loss or gradient at step {first_bad}; the update was not applied. "
        f"Last good checkpoint: {where}. Lower config.optim.lr, check the data, or set "
        f"config.on_nonfinite='skip' to skip such steps."
    )


def _write_window(writer, step: int, window: list[dict[str, jax.Array]]) -> None:
    """Average a window of per-step metrics; the only place they leave the device."""
    host = jax.device_get(window)
    scalars = {name: float(np.mean([m[name] for m in host])) for name in host[0]}
    writer.write_scalars(step, scalars)


def _metric_writer(workdir: Path):
    from clu import metric_writers

    return metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0, asynchronous=True
    )


def _progress_hooks(config, writer) -> list[Callable[[int], None]]:
    from clu import periodic_actions

    if jax.process_index() > 0:
        return []
    return [
        periodic_actions.ReportProgress(
            num_train_steps=config.total_steps, writer=writer, every_steps=config.log_every
        )
    ]


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.raised = False
        self._previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
