"""Continuing an original MAE / SemMAE training `.pth` in this project's optimizer: its AdamW
moments and its position in the run placed into the optax state, as the original's `--resume`.

The optax-state surgery lives here, beside the reading of the torch optimizer
(`convert/reader/optimizer.py`): it is about another framework's file, not this project's
checkpoints.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convert.reader.optimizer import TorchAdamState
from semmae_jax.checkpoint import ResumeTarget
from semmae_jax.runtime.run_log import RunLog


def continue_adam_run(state: Any, adam: TorchAdamState, path: str, target: ResumeTarget, log: RunLog) -> Any:
    """`state` with `adam`'s moments, at the start of the epoch after the file's, as the original's `--resume`."""
    step = (adam.epoch + 1) * target.length.steps_per_epoch
    updates = target.length.updates(step)
    opt_state = with_adam_moments(state.opt_state, adam.mu, adam.nu, adam.steps, updates)
    log.print(f"resuming from {path}: params and AdamW state ({adam.steps} updates), continuing at epoch "
              f"{adam.epoch + 1} (step {step})")
    if adam.steps != updates:
        log.print(f"note: the file's run made {adam.steps} optimizer updates in {adam.epoch + 1} epochs, "
                  f"this one makes {updates}: the data or batch differ from the original run's")
    if tuple(adam.betas) != tuple(target.betas):
        log.print(f"note: the file's AdamW betas are {adam.betas}; this run uses {target.betas}")
    return state.replace(step=jax.device_put(jnp.asarray(step, state.step.dtype), state.step.sharding),
                         opt_state=opt_state)


def with_adam_moments(opt_state: Any, mu: Any, nu: Any, adam_count: int, updates: int) -> Any:
    """`opt_state` continued from another framework's AdamW: its moments, its step count.

    `mu` / `nu` are full params-shaped trees (host arrays); each lands where, and as,
    the initialised moment is (frozen parameters, which have none, are skipped). Adam's
    count takes `adam_count` (its bias correction), the schedule's and the accumulator's
    counts take `updates`, the optimizer updates this run's step counter stands for.
    """

    def moments(old: Any, new: Any) -> Any:
        def place(path: tuple, leaf: Any, value: Any) -> Any:
            if isinstance(leaf, optax.MaskedNode):
                return leaf
            if np.shape(value) != leaf.shape:
                raise ValueError(f"AdamW moment of {jax.tree_util.keystr(path)} has shape {np.shape(value)}, the "
                                 f"parameter {leaf.shape} (another image size? moments cannot be resampled)")
            return jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding)

        return jax.tree_util.tree_map_with_path(place, old, new, is_leaf=lambda x: isinstance(x, optax.MaskedNode))

    def count(old: jax.Array, value: int) -> jax.Array:
        return jax.device_put(jnp.asarray(value, old.dtype), old.sharding)

    def replace(node: Any) -> Any:
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(count=count(node.count, adam_count), mu=moments(node.mu, mu), nu=moments(node.nu, nu))
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=count(node.count, updates))
        if isinstance(node, optax.MultiStepsState):
            inner = jax.tree.map(replace, node.inner_opt_state, is_leaf=is_state)
            return node._replace(gradient_step=count(node.gradient_step, updates), inner_opt_state=inner)
        return node

    def is_state(node: Any) -> bool:
        return isinstance(node, (optax.ScaleByAdamState, optax.ScaleByScheduleState, optax.MultiStepsState))

    return jax.tree.map(replace, opt_state, is_leaf=is_state)
