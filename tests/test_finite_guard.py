"""The step's finite guard (`apply_gradients`) covers everything a step writes and a checkpoint saves:
params, the optimizer's moments and the model state, not only the params; and it holds no second
copy of the state while it decides."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semmae_jax.train.state import TrainState
from semmae_jax.train.steps import apply_gradients

TX = optax.adamw(1e-3, weight_decay=0.05)


def start() -> TrainState:
    params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4), "b": jnp.zeros(4, jnp.float32)}
    return TrainState(step=jnp.int32(5), params=params, opt_state=TX.init(params), rng=jax.random.key(0),
                      model_state={"batch_stats": {"mean": jnp.ones(4, jnp.float32)}})


@jax.jit
def step(state: TrainState, scale: jax.Array, stats: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    grads = jax.tree.map(lambda p: jnp.full_like(p, scale), state.params)
    return apply_gradients(state, TX, grads, jnp.float32(1.0), model_state={"batch_stats": {"mean": stats}})


def leaves(state: TrainState) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state, state.model_state))]


def assert_unchanged(before: TrainState, after: TrainState) -> None:
    for old, new in zip(leaves(before), leaves(after), strict=True):
        np.testing.assert_array_equal(new, old)
    assert int(after.step) == int(before.step) + 1  # only the step count moves on


def test_a_finite_gradient_that_overflows_adamws_second_moment_is_refused():
    """g = 1e20 is finite in float32, g^2 is not: nu would be inf, the update mu/sqrt(nu) 0 and the params
    finite, so a guard on the params alone keeps the step (and every later update is 0)."""
    before = start()
    after, metrics = step(before, jnp.float32(1e20), jnp.full(4, 2.0, jnp.float32))
    assert float(metrics["nonfinite"]) == 1.0 and float(metrics["nonfinite_loss"]) == 0.0
    assert_unchanged(before, after)


def test_a_non_finite_model_state_is_refused():
    before = start()
    after, metrics = step(before, jnp.float32(0.1), jnp.array([1.0, jnp.inf, 1.0, 1.0], jnp.float32))
    assert float(metrics["nonfinite"]) == 1.0 and float(metrics["nonfinite_loss"]) == 0.0
    assert_unchanged(before, after)


def test_a_sane_step_is_applied_to_params_moments_and_model_state():
    before = start()
    after, metrics = step(before, jnp.float32(0.1), jnp.full(4, 2.0, jnp.float32))
    assert float(metrics["nonfinite"]) == 0.0
    changed = [not np.array_equal(old, new) for old, new in zip(leaves(before), leaves(after), strict=True)]
    assert all(changed), changed  # every leaf moved: w, b, the count, mu, nu and the stats
    assert all(np.isfinite(x).all() for x in leaves(after))


def test_the_guard_holds_no_second_copy_of_the_state():
    """XLA's memory analysis of the donated, guarded update: choosing between the new and the old state
    with `jnp.where` kept the whole new state (params and both moments, 36 MiB here) beside the old
    one, 42 MiB of temporaries; asking first whether the update is finite and then writing it over
    the donated state keeps 12 (on a CPU, the per-value finiteness flags the reductions read)."""
    params = {f"w{i}": jax.ShapeDtypeStruct((512, 1024), jnp.float32) for i in range(6)}
    state = jax.eval_shape(lambda p: TrainState(step=jnp.int32(0), params=p, opt_state=TX.init(p),
                                                rng=jax.random.key(0)), params)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))

    def update(state: TrainState, grads: dict) -> tuple[TrainState, dict[str, jax.Array]]:
        return apply_gradients(state, TX, grads, jnp.float32(1.0))

    memory = jax.jit(update, donate_argnums=0).lower(state, params).compile().memory_analysis()
    assert memory.alias_size_in_bytes >= state_bytes  # the new state is written over the donated one
    assert memory.temp_size_in_bytes < state_bytes / 2, (memory.temp_size_in_bytes, state_bytes)
