"""The training state and its creation directly in its sharding.

`create_state` never materialises an unsharded copy: the shapes come from
`jax.eval_shape`, the placement from `sharding.PARAM_RULES`, and the initialiser runs
under `jax.jit(..., out_shardings=...)` so each device only ever holds its shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from semmae_jax import sharding
from semmae_jax.paths import flat_by_path


@flax.struct.dataclass
class TrainState:
    """What a checkpoint must hold to continue exactly: step, params, optimizer state, rng."""

    step: jax.Array  # micro-batches seen since the start of the run
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; per-step keys are fold_in(rng, step)

    def step_key(self, stream: int) -> jax.Array:
        """A key unique to (this step, stream), so a resumed run draws what the first would."""
        return jax.random.fold_in(jax.random.fold_in(self.rng, self.step), stream)


def state_shardings(abstract_state: TrainState, logical_specs: Any, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf of the state, following `sharding.PARAM_RULES`."""
    pspecs = sharding.param_specs(abstract_state.params, logical_specs, mesh)
    ospecs = sharding.specs_like_params(abstract_state.opt_state, pspecs, abstract_state.params)
    specs = TrainState(step=PartitionSpec(), params=pspecs, opt_state=ospecs, rng=PartitionSpec())
    return sharding.named(mesh, specs)


def create_state(
    model: nn.Module,
    make_tx: Callable[[Any], optax.GradientTransformation],
    example_inputs: tuple[jax.ShapeDtypeStruct, ...],
    mesh: Mesh,
    seed: int,
    init_params: Any = None,
) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
    """Initialise (or place `init_params` into) a sharded TrainState.

    Returns (state, its shardings, the optimizer). `make_tx` receives the abstract
    params, as the optimizer's tables (decay masks, layer scales) depend on them.
    """
    init_key = jax.random.key(seed)
    rngs = {"params": init_key, "mask": init_key, "dropout": init_key}
    boxed = jax.eval_shape(lambda *x: model.init(rngs, *x), *example_inputs)["params"]
    logical_specs = nn.get_partition_spec(boxed)
    abstract_params = nn.unbox(boxed)
    tx = make_tx(abstract_params)

    def build(params: Any) -> TrainState:
        if params is None:
            params = nn.unbox(model.init(rngs, *[jnp.zeros(x.shape, x.dtype) for x in example_inputs])["params"])
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.key(seed + 1)
        )

    build = sharding.with_logical_rules(build)
    abstract_state = jax.eval_shape(build, abstract_params)
    shardings = state_shardings(abstract_state, logical_specs, mesh)
    if init_params is None:
        state = jax.jit(lambda: build(None), out_shardings=shardings)()
    else:
        _check_same_shapes(init_params, abstract_params)
        placed = jax.device_put(init_params, shardings.params)
        state = jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings)(placed)
    return state, shardings, tx


def _check_same_shapes(given: Any, expected: Any) -> None:
    flat_given = {path: tuple(x.shape) for path, x in flat_by_path(given).items()}
    flat_expected = {path: tuple(x.shape) for path, x in flat_by_path(expected).items()}
    missing, unexpected = (
        sorted(flat_expected.keys() - flat_given.keys()),
        sorted(flat_given.keys() - flat_expected.keys()),
    )
    wrong = [
        f"{k}: {flat_given[k]} vs model {flat_expected[k]}"
        for k in sorted(flat_expected.keys() & flat_given.keys())
        if flat_given[k] != flat_expected[k]
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"initial params do not fit the model: missing {missing}, unexpected {unexpected}, wrong shapes {wrong}"
        )
