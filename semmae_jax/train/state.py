"""The training state and its creation directly in its sharding.

`create_state` never materialises an unsharded copy: the shapes come from
`jax.eval_shape`, the placement from `sharding.PARAM_RULES`, and the initialiser runs
under `jax.jit(..., out_shardings=...)` so each device only ever holds its shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from semmae_jax import sharding
from semmae_jax.key_paths import flat_by_path, map_with_path


@flax.struct.dataclass
class TrainState:
    """What a checkpoint must hold to continue exactly: step, params, optimizer state, rng."""

    step: jax.Array  # micro-batches seen since the start of the run
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; per-step keys are fold_in(rng, step)
    model_state: Any = flax.struct.field(default_factory=dict)  # other collections, e.g. batch_stats
    frozen: Any = flax.struct.field(default_factory=dict)  # step inputs never trained nor saved (a probed encoder)

    def step_key(self, stream: int) -> jax.Array:
        """A key unique to (this step, stream), so a resumed run draws what the first would."""
        return jax.random.fold_in(jax.random.fold_in(self.rng, self.step), stream)


def state_shardings(abstract_state: TrainState, logical_specs: Any, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf of the state, following `sharding.PARAM_RULES`."""
    pspecs = sharding.param_specs(abstract_state.params, logical_specs, mesh)
    ospecs = sharding.specs_like_params(abstract_state.opt_state, pspecs, abstract_state.params)
    mspecs = jax.tree.map(lambda x: PartitionSpec(), abstract_state.model_state)
    specs = TrainState(step=PartitionSpec(), params=pspecs, opt_state=ospecs, rng=PartitionSpec(), model_state=mspecs,
                       frozen=jax.tree.map(lambda x: PartitionSpec(), abstract_state.frozen))
    return sharding.named(mesh, specs)


@dataclasses.dataclass(frozen=True)
class StatePlan:
    """A TrainState before it exists: shapes and shardings (`abstract`), the optimizer,
    and the function that builds it (from given params, or from an init when None)."""

    abstract: TrainState
    shardings: TrainState
    tx: optax.GradientTransformation
    build: Callable[[Any], TrainState]
    abstract_params: Any


def plan_state(
    model: nn.Module,
    make_tx: Callable[[Any], optax.GradientTransformation],
    example_inputs: tuple[jax.ShapeDtypeStruct, ...],
    mesh: Mesh,
    seed: int,
) -> StatePlan:
    """Shapes via `jax.eval_shape`, placement via `sharding.PARAM_RULES`; nothing allocated.

    `make_tx` receives the abstract params, as the optimizer's tables (decay masks,
    layer scales) depend on them.
    """
    init_key = jax.random.key(seed)
    rngs = {"params": init_key, "mask": init_key, "dropout": init_key}
    boxed = jax.eval_shape(lambda *x: model.init(rngs, *x), *example_inputs)["params"]
    abstract_params = nn.unbox(boxed)
    tx = make_tx(abstract_params)

    @sharding.with_logical_rules
    def build(params: Any) -> TrainState:
        variables = nn.unbox(model.init(rngs, *[jnp.zeros(x.shape, x.dtype) for x in example_inputs]))
        params = variables.pop("params") if params is None else params
        variables.pop("params", None)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key(seed + 1), model_state=variables)

    shapes = jax.eval_shape(build, abstract_params)
    shardings = state_shardings(shapes, nn.get_partition_spec(boxed), mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return StatePlan(abstract, shardings, tx, build, abstract_params)


def create_state(
    model: nn.Module,
    make_tx: Callable[[Any], optax.GradientTransformation],
    example_inputs: tuple[jax.ShapeDtypeStruct, ...],
    mesh: Mesh,
    seed: int,
    init_params: Any = None,
) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
    """Initialise (or place `init_params` into) a sharded TrainState, never unsharded.

    Returns (state, its shardings, the optimizer).
    """
    plan = plan_state(model, make_tx, example_inputs, mesh, seed)
    if init_params is None:
        state = jax.jit(lambda: plan.build(None), out_shardings=plan.shardings)()
    else:
        _check_same_shapes(init_params, plan.abstract_params)
        placed = jax.device_put(init_params, plan.shardings.params)
        state = jax.jit(plan.build, in_shardings=(plan.shardings.params,), out_shardings=plan.shardings)(placed)
    return state, plan.shardings, plan.tx


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


def merge_pretrained(target: Any, source: Any) -> tuple[Any, list[str], list[str]]:
    """`target` params with every leaf `source` has in the same path and shape, placed as in `target`.

    `target` leaves are arrays or `jax.ShapeDtypeStruct`s with shardings.
    Returns (params, missing: target paths left as initialised, unused: source paths not
    taken) — MAE's `load_state_dict(strict=False)` report. A head of another shape
    (other classes) is dropped, as the original does, and so reported missing.
    """
    src, dst = flat_by_path(source), flat_by_path(target)
    taken = {p for p, x in dst.items() if p in src and tuple(np.shape(src[p])) == tuple(x.shape)}

    def placed(path: str, like: Any) -> Any:
        return jax.device_put(np.asarray(src[path], like.dtype), like.sharding) if path in taken else like

    return map_with_path(placed, target), sorted(set(dst) - taken), sorted(set(src) - taken)
