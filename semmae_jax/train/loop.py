"""The epoch loop every training job shares: steps, progress, logs, checkpoints, resume.

A job (pretraining, fine-tuning, part learning) builds its state and jitted step, then
hands them to `train` with a few callbacks; everything that must behave the same in
every job lives here once:

* resume order: a checkpoint in the run's own directory > `--resume` > scratch;
* exact resume: the data order, the augmentation and every step's rng depend only on
  (seed, epoch, step), and a checkpoint records the step, so a run killed anywhere and
  restarted from its last checkpoint ends with the same parameters;
* no host round trip per step: metrics are fetched every `log_every` steps;
* a non-finite loss stops the run before anything is saved, so the last checkpoint
  stays good; SIGTERM (preemption) saves a checkpoint at the current step and stops.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from semmae_jax.checkpoint import RunCheckpoints
from semmae_jax.data.global_arrays import prefetch_to_device
from semmae_jax.distributed import is_primary
from semmae_jax.metrics_log import RunLog
from semmae_jax.train.optim import with_adam_moments
from semmae_jax.train.state import TrainState

# (path, model name) -> a `.pth`'s AdamW state (moments in the params' layout, steps, epoch, betas), or None
OptimizerLoader = Callable[[str, str], Any]


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass
class Schedule:
    """The run's length and cadences, in loader steps (micro-batches)."""

    epochs: int
    steps_per_epoch: int
    save_every: int = 1  # epochs
    save_every_steps: int = 0  # 0 = only at epoch ends
    log_every: int = 20

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def progress(self, step: int) -> float:
        """Fraction of the run done before `step`: the fractional epoch over the epochs."""
        return min(step / self.total_steps, 1.0)

    def saves_after(self, step: int) -> bool:
        """Checkpoint once `step` steps are done?"""
        end_of_epoch = step % self.steps_per_epoch == 0
        epoch = step // self.steps_per_epoch
        if end_of_epoch and (epoch % self.save_every == 0 or step == self.total_steps):
            return True
        return bool(self.save_every_steps) and step % self.save_every_steps == 0


# ---------------------------------------------------------------- checkpoints


def _items(state: TrainState, rng_data: Any) -> dict[str, Any]:
    items = {"params": state.params, "opt_state": state.opt_state, "train_state": {"step": state.step, "rng": rng_data}}
    return {**items, "model_state": state.model_state} if state.model_state else items


def state_items(state: TrainState) -> dict[str, Any]:
    """The array items of a checkpoint (the rng as raw key data: orbax stores plain arrays)."""
    return _items(state, jax.random.key_data(state.rng))


def abstract_items(state_shapes: TrainState) -> dict[str, Any]:
    """`state_items` of the abstract state, for a restore that places arrays.

    `state_shapes` must carry the target shardings (`checkpoint.abstract_like(state)`):
    they, not the saved ones, decide where each restored shard goes.
    """
    key_data = jax.eval_shape(jax.random.key_data, state_shapes.rng)
    return _items(state_shapes, jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=state_shapes.step.sharding))


def restore_state(checkpoints: RunCheckpoints, step: int, state_shapes: TrainState) -> TrainState:
    """The full state saved at `step`, restored straight into the shardings of `state_shapes` (any mesh)."""
    arrays, _ = checkpoints.restore(step, abstract_items(state_shapes))
    train = arrays["train_state"]
    return TrainState(
        step=train["step"], params=arrays["params"], opt_state=arrays["opt_state"],
        rng=jax.random.wrap_key_data(train["rng"]), model_state=arrays.get("model_state", {}),
    )


def resume(
    state: TrainState,
    shapes: TrainState,
    run_checkpoints: RunCheckpoints,
    resume_from: str | None,
    load_params: Callable[[str], Any] | None,
    log: RunLog,
    import_optimizer: Callable[[str, TrainState], TrainState | None] | None = None,
) -> TrainState:
    """Continue this run, or start from `--resume`, or keep the fresh state (in that order).

    `--resume` may be another run's checkpoint directory (full state: optimizer and step
    too) or anything `load_params` reads (a converted checkpoint, a `.pth`): its params,
    then, where `import_optimizer` finds one in the file (the original's training
    checkpoints), its optimizer state and position too.
    """
    latest = run_checkpoints.latest_step()
    if latest is not None:
        log.print(f"resuming this run from its checkpoint at step {latest} in {run_checkpoints.directory}")
        return restore_state(run_checkpoints, latest, shapes)
    if not resume_from or resume_from == "auto":
        return state
    other = Path(resume_from)
    if other.is_dir() and not other.suffix and _has_full_state(other):
        source = RunCheckpoints(other, async_save=False)
        step = source.latest_step()
        log.print(f"resuming from {other} (step {step}: params, optimizer state and position)")
        return restore_state(source, step, shapes)
    if load_params is None:
        raise ValueError(f"--resume {resume_from}: not a run checkpoint directory")
    params = jax.device_put(load_params(resume_from), jax.tree.map(lambda s: s.sharding, shapes.params))
    state = state.replace(params=params)
    continued = import_optimizer(resume_from, state) if import_optimizer else None
    if continued is not None:
        return continued
    log.print(f"starting from the params of {resume_from} (fresh optimizer state, step 0)")
    return state


def continue_torch_run(
    load_optimizer: OptimizerLoader, model_name: str, schedule: Schedule, accum_iter: int, betas: tuple[float, float],
    log: RunLog, path: str, state: TrainState,
) -> TrainState | None:
    """`state` (params loaded from `path`) with the file's AdamW state, at the start of the epoch after
    the file's, as the original's `--resume` continues; None when the file has no optimizer."""
    torch_state = load_optimizer(path, model_name)
    if torch_state is None:
        return None
    step = (torch_state.epoch + 1) * schedule.steps_per_epoch
    updates = step // accum_iter
    opt_state = with_adam_moments(state.opt_state, torch_state.mu, torch_state.nu, torch_state.steps, updates)
    log.print(f"resuming from {path}: params and AdamW state ({torch_state.steps} updates), continuing at epoch "
              f"{torch_state.epoch + 1} (step {step})")
    if torch_state.steps != updates:
        log.print(f"note: the file's run made {torch_state.steps} optimizer updates in {torch_state.epoch + 1} epochs, "
                  f"this one makes {updates}: the data or batch differ from the original run's")
    if tuple(torch_state.betas) != tuple(betas):
        log.print(f"note: the file's AdamW betas are {torch_state.betas}; this run uses {betas}")
    return state.replace(step=jax.device_put(jnp.asarray(step, state.step.dtype), state.step.sharding),
                         opt_state=opt_state)


def _has_full_state(directory: Path) -> bool:
    steps = [p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return bool(steps) and (max(steps, key=lambda p: int(p.name)) / "opt_state").is_dir()


def save(checkpoints: RunCheckpoints, state: TrainState, schedule: Schedule, config: dict[str, Any]) -> None:
    """Checkpoint `state` with where the run is (step, epoch, step in epoch) and its config, for resume."""
    step = int(state.step)
    progress = {"step": step, "epoch": step // schedule.steps_per_epoch, "step_in_epoch": step % schedule.steps_per_epoch}
    checkpoints.save(step, state_items(state), {"progress": progress, "config": config})


# ---------------------------------------------------------------- the loop


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints at the next step boundary and stops."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class EpochStats:
    """Device-side sums of one epoch's metrics (no sync until the epoch ends)."""

    sums: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    count: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, metrics: dict[str, jax.Array]) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, jnp.zeros((), jnp.float32)) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {name: float(value) / max(self.count, 1) for name, value in self.sums.items()}


def check_finite(metrics: dict[str, float], where: str, checkpoints: RunCheckpoints) -> None:
    """Stop the run on a non-finite loss, saying which checkpoint is the last good one (the original's message)."""
    loss = metrics.get("loss", 0.0)
    if not math.isfinite(loss):
        last = checkpoints.latest_step()
        kept = f"the last good checkpoint is step {last} in {checkpoints.directory}" if last is not None else "no checkpoint was written"
        raise NonFiniteLoss(f"Loss is {loss} at {where}, stopping training; {kept}")


@dataclasses.dataclass
class Trainer:
    """Runs a jitted step over the epochs of a schedule, with everything around it.

    `step_fn(state, batch, scalar)` is the job's jitted step; `step_scalar(progress)`
    gives the traced scalar it takes (SemMAE's alpha; 0 where unused);
    `on_epoch_end(epoch, state, first_batch)` may evaluate or draw pictures and returns
    extra values for the epoch's log line.
    """

    step_fn: Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict[str, jax.Array]]]
    epoch_batches: Callable[[int, int], Iterator[dict[str, np.ndarray]]]
    mesh: jax.sharding.Mesh
    schedule: Schedule
    lr_at: Callable[[int], float]
    checkpoints: RunCheckpoints
    config: dict[str, Any]
    log: RunLog
    images_per_step: int
    step_scalar: Callable[[float], float] = lambda progress: 0.0
    scalar_name: str | None = None  # shown and logged when set (pretraining: "alpha")
    on_epoch_end: Callable[[int, TrainState, dict[str, jax.Array]], dict[str, float]] | None = None

    def run(self, state: TrainState) -> TrainState:
        """From `state.step` to the end of the schedule (or a SIGTERM); the final state."""
        preemption = _Preemption()
        try:
            stopped = False
            while not stopped and int(state.step) < self.schedule.total_steps:
                state, stopped = self._epoch(state, preemption)
            return state
        finally:
            self.checkpoints.wait()
            preemption.restore()

    def _epoch(self, state: TrainState, preemption: _Preemption) -> tuple[TrainState, bool]:
        schedule = self.schedule
        epoch, start = divmod(int(state.step), schedule.steps_per_epoch)
        stats, first_batch = EpochStats(), None
        bar = tqdm(total=schedule.steps_per_epoch, initial=start, desc=f"epoch {epoch}", disable=not is_primary(),
                   dynamic_ncols=True)
        window = (time.perf_counter(), 0)
        batches = prefetch_to_device(self.epoch_batches(epoch, start), self.mesh)
        for step in range(start + epoch * schedule.steps_per_epoch, (epoch + 1) * schedule.steps_per_epoch):
            batch = next(batches)
            first_batch = first_batch or batch
            scalar = self.step_scalar(schedule.progress(step))
            state, metrics = self.step_fn(state, batch, jnp.asarray(scalar, jnp.float32))
            stats.add(metrics)
            bar.update(1)
            done = step + 1
            saving = preemption.requested or schedule.saves_after(done)
            if saving or done % schedule.log_every == 0 or done % schedule.steps_per_epoch == 0:
                window = self._report(done, metrics, scalar, window, bar, f"epoch {epoch} step {done}")
            if saving:
                save(self.checkpoints, state, schedule, self.config)
            if preemption.requested:
                bar.close()
                self.log.print(f"SIGTERM: saved a checkpoint at step {done} in {self.checkpoints.directory}; stopping")
                return state, True
        bar.close()
        self._end_epoch(epoch, state, stats, first_batch)
        return state, False

    def _report(self, step: int, metrics: dict[str, jax.Array], scalar: float, window: tuple[float, int],
                bar: tqdm, where: str) -> tuple[float, int]:
        """Fetch the step's metrics (the only host sync), check them, show and log them."""
        values = {k: float(v) for k, v in metrics.items()}
        check_finite(values, where, self.checkpoints)
        since, steps_before = window
        rate = (bar.n - steps_before) * self.images_per_step / max(time.perf_counter() - since, 1e-9)
        values.update({"lr": self.lr_at(step), "images_per_sec": rate})
        shown = {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}", "img_s": f"{rate:.1f}"}
        if self.scalar_name:
            values[self.scalar_name] = scalar
            shown[self.scalar_name] = f"{scalar:.3f}"
        bar.set_postfix(shown)
        self.log.scalars(step, {f"train/{k}": v for k, v in values.items()})
        return time.perf_counter(), bar.n

    def _end_epoch(self, epoch: int, state: TrainState, stats: EpochStats, first_batch: Any) -> None:
        means = stats.means()
        check_finite(means, f"the end of epoch {epoch}", self.checkpoints)
        step = int(state.step)
        line = {f"train_{k}": v for k, v in means.items()}
        line.update({"train_lr": self.lr_at(step), "epoch": epoch, "seconds": time.perf_counter() - stats.start})
        if self.scalar_name:
            line[f"train_{self.scalar_name}"] = self.step_scalar(self.schedule.progress(step - 1))
        if self.on_epoch_end is not None and first_batch is not None:
            line.update(self.on_epoch_end(epoch, state, first_batch))
        self.log.epoch_line(line)
