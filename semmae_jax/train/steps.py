"""The jitted pretraining step: semantic (or random) noise -> MAE -> loss -> AdamW update.

Kept apart from the job so that benchmarks time exactly the step the job runs. Every
job's step has one shape, `step(state, batch) -> (state, metrics)`; what changes per step
(SemMAE's alpha) is computed from `state.step` on the device and returned as a metric.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from semmae_jax import masking, sharding
from semmae_jax.train.state import TrainState

NOISE_STREAM = 0

Step = Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


def alpha_at(step: jax.Array, setting: masking.MaskingSetting | int, total_steps: int, gamma: float) -> jax.Array:
    """SemMAE's alpha before `step` of `total_steps`: `masking.masking_alpha` of the fractional epoch, traced."""
    setting = masking.MaskingSetting(setting)
    if setting is not masking.MaskingSetting.ADAPTIVE:
        return jnp.float32(masking.masking_alpha(setting, 0.0))
    progress = jnp.clip(step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return progress**gamma


def make_pretrain_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    mask_ratio: float,
    setting: masking.MaskingSetting | int,
    num_parts: int,
    total_steps: int = 1,
    gamma: float = 2.0,
    labelled_tokens: int = 0,
) -> Step:
    """`step(state, batch) -> (state, metrics)`; batch has 'image' and 'part_labels'.

    The masking noise is drawn inside the step from a key that depends only on the
    run's seed and the step number, and alpha from the step over `total_steps`, so a
    resumed run masks exactly as the first would. `labelled_tokens` K > 0: the model sees
    K part-labelled positions of each image (`masking.tokens_and_noise`).
    """

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, Any]]:
        alpha = alpha_at(state.step, setting, total_steps, gamma)
        noise, positions = masking.tokens_and_noise(
            state.step_key(NOISE_STREAM), batch["part_labels"], labelled_tokens=labelled_tokens, setting=setting,
            mask_ratio=mask_ratio, alpha=alpha, num_parts=num_parts)

        def loss_fn(params: Any) -> jax.Array:
            loss, _, _ = model.apply({"params": params}, batch["image"], mask_ratio, noise, positions)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        state, refused = apply_gradients(state, tx, grads, loss)
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "alpha": alpha, **refused}

    return step


def apply_gradients(state: TrainState, tx: optax.GradientTransformation, grads: Any, loss: jax.Array,
                    **changes: Any) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `grads`, applied only if it is finite: (the state one micro-batch later,
    metrics `nonfinite`: 1.0 where the step was refused, and `nonfinite_loss`: 1.0 where the loss or
    gradient itself was not finite, i.e. the params it started from had diverged already).
    `changes`: other fields the step sets, e.g. model_state.

    The step is refused unless the loss, the gradient and every floating leaf it would write
    (the new params, the new optimizer state, `changes`) are finite: a huge but finite
    gradient overflows AdamW's second moment to inf while the params it moves stay finite.
    A refused step leaves all of them as they were (only the step count moves on), so no
    state the loop can save ever holds a NaN or inf; the loop decides whether to stop
    (`--max_nonfinite_steps`).

    The update is computed twice: once only to ask whether it is finite (reductions to one
    flag, nothing of it kept), then for real inside `lax.cond`, written over the donated
    state. Computed once and chosen with `jnp.where(finite, new, old)`, the whole new state
    would have to exist beside the old one until the flag is known: a second copy of the
    params and moments at every step (`bench/memory_account.py --batch N`'s temporaries,
    `tests/test_finite_guard.py`). The second pass reads the state once more: on a CPU the
    step's time did not move beyond its noise (docs/benchmarks.md); on a GPU `bench/gpu.py` times it.
    """
    current = {"params": state.params, "opt_state": state.opt_state, **{name: getattr(state, name) for name in changes}}

    def updated(current: dict[str, Any], grads: Any, changes: dict[str, Any]) -> dict[str, Any]:
        updates, opt_state = tx.update(grads, current["opt_state"], current["params"])
        return {"params": optax.apply_updates(current["params"], updates), "opt_state": opt_state, **changes}

    inputs_finite = jnp.isfinite(loss) & _all_finite(grads)
    finite = inputs_finite & _all_finite(updated(current, grads, changes))
    kept = jax.lax.cond(finite, updated, lambda current, grads, changes: current, current, grads, changes)
    return state.replace(step=state.step + 1, **kept), {"nonfinite": 1.0 - finite.astype(jnp.float32),
                                                        "nonfinite_loss": 1.0 - inputs_finite.astype(jnp.float32)}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def jit_step(step: Step, state_shardings: TrainState, batch_shardings: Any, mesh: jax.sharding.Mesh) -> Step:
    """Jit a `(state, batch)` step with the state donated and its sharding kept.

    The step is traced under the logical axis rules, so the activation constraints in
    the model (`act_batch`, ...) bind to the mesh; call it inside `jax.set_mesh(mesh)`.
    """
    return jax.jit(
        sharding.with_logical_rules(step),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
