"""The epoch loop every training job shares: steps, progress, logs, checkpoints.

The run skeleton (`run.py`) hands a `Trainer` the jitted step and the loader; everything
that must behave the same in every job during the epochs lives here once:

* exact resume: the data order, the augmentation and every step's rng depend only on
  (seed, epoch, step), and a checkpoint records the step, so a run killed anywhere and
  restarted from its last checkpoint ends with the same parameters;
* no host round trip per step: metrics are fetched every `log_every` steps;
* a non-finite loss stops the run before anything is saved, so the last checkpoint
  stays good; a preemption notice (SIGTERM to any process) makes every process save the
  same step and stop (`preemption.py`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from semmae_jax.checkpoint import RunCheckpoints, save_state
from semmae_jax.checkpoint.local import LocalCheckpoints
from semmae_jax.data.global_arrays import prefetch_to_device
from semmae_jax.runtime import distributed
from semmae_jax.runtime.distributed import is_primary
from semmae_jax.runtime.run_log import RunLog
from semmae_jax.train.instruments import Instruments
from semmae_jax.train.preemption import Preemption
from semmae_jax.train.state import TrainState
from semmae_jax.train.steps import Step
from semmae_jax.training_length import TrainingLength

COUNTS = ("nonfinite", "nonfinite_loss")  # per-step flags of refused steps: counted, never averaged


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the loop logs and saves (the run's length is `TrainingLength`'s)."""

    save_every: int = 1  # epochs
    save_every_steps: int = 0  # 0 = only at epoch ends
    log_every: int = 20  # steps

    def saves_after(self, step: int, length: TrainingLength) -> bool:
        """Checkpoint once `step` steps are done?"""
        epoch, within = divmod(step, length.steps_per_epoch)
        if within == 0 and (epoch % self.save_every == 0 or step == length.total_steps):
            return True
        return bool(self.save_every_steps) and step % self.save_every_steps == 0


# ---------------------------------------------------------------- the loop


@dataclasses.dataclass
class EpochStats:
    """Device-side sums of one epoch's metrics (no sync until the epoch ends).

    A step skipped as non-finite (`nonfinite` = 1) adds to no mean but its own count.
    The sums travel in every checkpoint (`as_json` / `from_json`), so an epoch cut by a
    preemption and resumed reports the figures of the whole epoch.
    """

    sums: dict[str, Any] = dataclasses.field(default_factory=dict)
    good: Any = 0.0  # steps that were applied
    first_diverged: Any = -1  # the state index (step before the update) of the first non-finite loss
    elapsed: float = 0.0  # seconds spent in this epoch before a resume
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, metrics: dict[str, jax.Array], step: int) -> None:
        ok = 1.0 - metrics.get("nonfinite", 0.0)
        diverged = metrics.get("nonfinite_loss", 0.0) > 0
        self.first_diverged = jnp.where((self.first_diverged < 0) & diverged, step, self.first_diverged)
        for name, value in metrics.items():
            value = value if name in COUNTS else jnp.where(ok > 0, value, 0.0)
            self.sums[name] = self.sums.get(name, jnp.zeros((), jnp.float32)) + value
        self.good = self.good + ok

    @property
    def skipped(self) -> float:
        return float(self.sums.get("nonfinite", 0.0))

    def means(self) -> dict[str, float]:
        good = max(float(self.good), 1.0)
        return {name: float(value) / good for name, value in self.sums.items() if name not in COUNTS}

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.start

    def as_json(self) -> dict[str, Any]:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "good": float(self.good), "seconds": self.seconds()}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> EpochStats:
        return cls({k: jnp.float32(v) for k, v in saved["sums"].items()}, jnp.float32(saved["good"]),
                   elapsed=saved["seconds"])


@dataclasses.dataclass
class Trainer:
    """Runs a jitted step over the epochs of the run's length, with everything around it.

    `step_fn(state, batch) -> (state, metrics)` is the job's jitted step (metrics may
    carry per-step schedule values such as SemMAE's `alpha`: they are shown and logged;
    `nonfinite` marks a step the step function refused to apply);
    `on_epoch_end(epoch, state, first_batch)` may evaluate or draw pictures and returns
    extra values for the epoch's log line. More than `max_nonfinite_steps` refused steps
    stop the run, naming the last checkpoint (every checkpoint is finite: refused steps
    change nothing). `instruments` times the loop (step time, MFU, input wait, goodput, traces).
    """

    step_fn: Step
    epoch_batches: Callable[[int, int], Iterator[dict[str, np.ndarray]]]
    mesh: jax.sharding.Mesh
    length: TrainingLength  # epochs, steps per epoch, the lr at any step
    cadence: Cadence
    checkpoints: RunCheckpoints
    config: dict[str, Any]
    log: RunLog
    instruments: Instruments
    on_epoch_end: Callable[[int, TrainState, dict[str, jax.Array]], dict[str, float]] | None = None
    max_nonfinite_steps: int = 0
    skipped_before: float = 0.0  # refused steps of the epochs before this one
    local: LocalCheckpoints | None = None  # `--local_save_every`: also saved every `local.every` steps

    def train(self, state: TrainState) -> TrainState:
        """From `state.step` to the end of the run (or a preemption notice); the final state."""
        preemption = Preemption(self.checkpoints, int(state.step))
        distributed.describe_checkpoints_with(self._last_complete)
        try:
            stopped = False
            while not stopped and int(state.step) < self.length.total_steps:
                state, stopped = self._epoch(state, preemption)
            return state
        finally:
            with self.instruments.phase("save"):
                for checkpoints in self._roots():
                    checkpoints.wait()
            preemption.close()
            self.instruments.finish()

    def _roots(self) -> list[RunCheckpoints]:
        return [self.checkpoints] + ([self.local] if self.local is not None else [])

    def _last_complete(self) -> str:
        """The run's newest complete checkpoints, for the line a dead peer ends the run with."""
        done = [(step, checkpoints) for checkpoints in self._roots()
                if (step := checkpoints.committed_step()) is not None]
        if not done:
            return "no checkpoint of this run was complete yet"
        return "the last complete checkpoint: " + ", ".join(
            f"{'local' if checkpoints.host_local else 'persistent'} step {step} in {checkpoints.directory}"
            for step, checkpoints in done)

    def _resumed_stats(self, step: int) -> EpochStats:
        """The epoch's sums so far, from the checkpoint the run resumed at (empty at an epoch start)."""
        held = [checkpoints for checkpoints in self._roots() if step in checkpoints.all_steps()]
        if step % self.length.steps_per_epoch == 0 or not held:
            return EpochStats()
        saved = held[0].json_item(step, "epoch_stats")
        return EpochStats.from_json(saved) if saved else EpochStats()

    def _epoch(self, state: TrainState, preemption: Preemption) -> tuple[TrainState, bool]:
        length, cadence = self.length, self.cadence
        epoch, start = divmod(int(state.step), length.steps_per_epoch)
        stats, first_batch = self._resumed_stats(int(state.step)), None
        bar = tqdm(total=length.steps_per_epoch, initial=start, desc=f"epoch {epoch}", disable=not is_primary(),
                   dynamic_ncols=True)
        batches = prefetch_to_device(self.epoch_batches(epoch, start), self.mesh)
        for step in range(start + epoch * length.steps_per_epoch, (epoch + 1) * length.steps_per_epoch):
            batch = self.instruments.next_batch(batches)
            first_batch = first_batch or batch
            state, metrics = self.instruments.step(self.step_fn, state, batch, step)
            stats.add(metrics, step)
            bar.update(1)
            done = step + 1
            preempted = preemption.reached(done)
            saving = preempted or cadence.saves_after(done, length)
            if saving or done % cadence.log_every == 0 or done % length.steps_per_epoch == 0:
                self._report(done, metrics, stats, bar, f"epoch {epoch} step {done}")
            if saving:
                with self.instruments.phase("save"):
                    self._save(state, stats)
            elif self.local is not None and self.local.due(done):
                with self.instruments.phase("save"):
                    self._save(state, stats, self.local)
            if preempted:
                bar.close()
                with self.instruments.phase("save"):
                    self.checkpoints.wait()
                self.log.print(f"preemption notice: saved a checkpoint at step {done} in {self.checkpoints.directory} "
                               "(every process at this step); stopping")
                return state, True
        bar.close()
        self._end_epoch(epoch, state, stats, first_batch)
        return state, False

    def _save(self, state: TrainState, stats: EpochStats, checkpoints: RunCheckpoints | None = None) -> None:
        epoch_stats = {} if int(state.step) % self.length.steps_per_epoch == 0 else stats.as_json()
        save_state(checkpoints or self.checkpoints, state, self.length.steps_per_epoch, self.config, epoch_stats)

    def _check_finite(self, stats: EpochStats, where: str) -> None:
        """Stop once more steps were refused as non-finite than `--max_nonfinite_steps` allows.

        Refused steps change nothing, so every checkpoint is finite; but a checkpoint whose
        params gave the first non-finite loss or gradient (step t, and any saved after it)
        diverged already: those are set aside as `<step>.diverged`, so that the same command
        with a lower lr resumes from the last good one. (A refused update from sane params,
        an lr too high for them, leaves their checkpoint good.)
        """
        skipped = self.skipped_before + stats.skipped
        if skipped <= self.max_nonfinite_steps:
            return
        first = int(stats.first_diverged)
        diverged = []
        for checkpoints in self._roots():  # a local step past the divergence must not be resumed either
            checkpoints.wait()
            steps = [s for s in checkpoints.all_steps() if self.skipped_before == 0 and s >= first >= 0]
            for step in steps:
                checkpoints.set_aside(step, "diverged")
            diverged += steps if checkpoints is self.checkpoints else []
        last = self.checkpoints.latest_step()
        kept = (f"the last good checkpoint is step {last} in {self.checkpoints.directory}" if last is not None
                else f"no good checkpoint is left in {self.checkpoints.directory}")
        aside = f" (diverged steps {diverged} set aside as *.diverged)" if diverged else ""
        raise NonFiniteLoss(f"Loss is non-finite at {where} ({int(skipped)} steps refused, --max_nonfinite_steps "
                            f"{self.max_nonfinite_steps}), stopping training; {kept}{aside}: rerun with a lower lr "
                            "to resume from it")

    def _report(self, step: int, metrics: dict[str, jax.Array], stats: EpochStats, bar: tqdm, where: str) -> None:
        """Fetch the step's metrics (the only host sync), check them, show and log them with the window's
        step time, images/s, MFU, input wait and device memory."""
        values = {k: float(v) for k, v in metrics.items()}
        self._check_finite(stats, where)
        figures = self.instruments.window((step - 1) // self.length.steps_per_epoch)
        values.update({"lr": self.length.lr_at(step), **figures})
        shown = {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}"}
        if "images_per_sec" in values:
            shown["img_s"] = f"{values['images_per_sec']:.1f}"
        if "alpha" in values:
            shown["alpha"] = f"{values['alpha']:.3f}"
        bar.set_postfix({**shown, **self.instruments.shown(figures)})
        self.log.scalars(step, {f"train/{k}": v for k, v in values.items() if k not in COUNTS})

    def _end_epoch(self, epoch: int, state: TrainState, stats: EpochStats, first_batch: Any) -> None:
        self._check_finite(stats, f"the end of epoch {epoch}")
        self.skipped_before += stats.skipped
        means = stats.means()
        line = {f"train_{k}": v for k, v in means.items()}
        if stats.skipped:
            line["nonfinite_steps"] = int(stats.skipped)
        line.update({"train_lr": self.length.lr_at(int(state.step)), "epoch": epoch, "seconds": stats.seconds(),
                     **self.instruments.epoch()})
        if self.on_epoch_end is not None and first_batch is not None:
            with self.instruments.phase("eval"):
                line.update(self.on_epoch_end(epoch, state, first_batch))
        with self.instruments.phase("save"):
            self.checkpoints.wait()  # the epoch's checkpoint is committed before its line: no line twice after a rerun
        self.log.epoch_line(line)
