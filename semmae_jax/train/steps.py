"""The jitted pretraining step: semantic (or random) noise -> MAE -> loss -> AdamW update.

Kept apart from the job so that benchmarks time exactly the step the job runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax

from semmae_jax import masking, sharding
from semmae_jax.train.state import TrainState

NOISE_STREAM = 0

PretrainStep = Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def make_pretrain_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    mask_ratio: float,
    setting: masking.MaskingSetting | int,
    num_parts: int,
) -> PretrainStep:
    """`step(state, batch, alpha) -> (state, metrics)`; batch has 'image' and 'part_labels'.

    The masking noise is drawn inside the step from a key that depends only on the
    run's seed and the step number, so a resumed run masks exactly as the first would.
    """

    def step(state: TrainState, batch: dict[str, jax.Array], alpha: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        noise = masking.masking_noise(
            state.step_key(NOISE_STREAM),
            batch["part_labels"],
            setting=setting,
            mask_ratio=mask_ratio,
            alpha=alpha,
            num_parts=num_parts,
        )

        def loss_fn(params: Any) -> jax.Array:
            loss, _, _ = model.apply({"params": params}, batch["image"], mask_ratio, noise)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def jit_step(step: Callable, state_shardings: TrainState, batch_shardings: Any, mesh: jax.sharding.Mesh) -> Callable:
    """Jit a `(state, batch, scalar)` step with the state donated and its sharding kept.

    The step is traced under the logical axis rules, so the activation constraints in
    the model (`act_batch`, ...) bind to the mesh; call it inside `jax.set_mesh(mesh)`.
    """
    replicated = sharding.replicated(mesh)
    return jax.jit(
        sharding.with_logical_rules(step),
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
