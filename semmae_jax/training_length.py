"""How long training runs, in the two units it is counted in, and the lr at any point.

The loop, the data order and the checkpoints count loader steps (micro-batches:
`state.step`); the optimizer and the lr schedule count updates, one every `accum_iter`
micro-batches (MAE's `--accum_iter`). `TrainingLength.updates` is the one place where one
unit becomes the other: the lr schedule, the lr the loop logs, and the continuation of an
original `.pth` run all ask this object, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses

import optax


def warmup_cosine(base_lr: float, min_lr: float, warmup_updates: int, total_updates: int) -> optax.Schedule:
    """MAE's schedule over optimizer updates: 0 -> base_lr linearly, then cosine to min_lr."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base_lr,
        warmup_steps=max(warmup_updates, 0),
        decay_steps=max(total_updates, warmup_updates + 1),
        end_value=min_lr,
    )


@dataclasses.dataclass(frozen=True)
class TrainingLength:
    """A run's length (epochs of `steps_per_epoch` micro-batches) and its lr along it.

    `peak_lr` is the lr after warm-up (the original's `blr x effective batch / 256`); the
    schedule warms up linearly over `warmup_epochs`, then follows a half-cycle cosine to
    `min_lr`, evaluated at every optimizer update.
    """

    epochs: int
    steps_per_epoch: int
    accum_iter: int = 1
    warmup_epochs: int = 0
    peak_lr: float = 0.0
    min_lr: float = 0.0

    def updates(self, steps: int) -> int:
        """Optimizer updates made in `steps` micro-batches: the one micro-batch -> update conversion."""
        return steps // self.accum_iter

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def total_updates(self) -> int:
        return self.updates(self.total_steps)

    @property
    def warmup_updates(self) -> int:
        return self.updates(self.warmup_epochs * self.steps_per_epoch)

    def progress(self, step: int) -> float:
        """Fraction of the run done before micro-batch `step`: the fractional epoch over the epochs."""
        return min(step / self.total_steps, 1.0)

    def lr_schedule(self) -> optax.Schedule:
        """The lr as a function of the optimizer's update count (what optax's transforms are given)."""
        return warmup_cosine(self.peak_lr, self.min_lr, self.warmup_updates, self.total_updates)

    def lr_at(self, step: int) -> float:
        """The lr applied at micro-batch `step`."""
        return float(self.lr_schedule()(self.updates(step)))
