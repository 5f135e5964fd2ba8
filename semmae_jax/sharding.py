"""Device meshes and where every array lives on them.

The mesh is named by a flag, `data:-1,fsdp:1,tensor:1` (axis sizes, -1 = the rest of
the devices). The batch is split over `data` and `fsdp`. Parameters (and the optimizer
state that mirrors them) are placed by one ordered table, `PARAM_RULES`: the first
regex that matches a parameter's path decides, and every parameter must match one.

* `tensor`: the dimensions whose logical name (set in `models/layers.py`) maps to the
  tensor axis in `LOGICAL_RULES` (attention heads, MLP hidden units) are split.
* `fsdp`: then the largest remaining dimension divisible by the fsdp axis is split, so
  that parameters and optimizer moments are not replicated on every device (ZeRO-3
  style; XLA gathers them where a layer needs them).
* `replicated`: small tensors read whole at every step (tokens, position tables).

Activations are pinned with logical names (`act_batch`, ...) through `LOGICAL_RULES`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from semmae_jax.key_paths import TOKENS_AND_TABLES, flat_by_path, map_with_path

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_MESH = "data:-1,fsdp:1,tensor:1"

# Logical axis name -> mesh axis (or axes, or None = not split).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_emb", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", None),
    ("kv", None),
    ("classes", None),
)

Placement = Literal["replicated", "tensor", "tensor+fsdp"]
# First match wins; every parameter path ('blocks_3/attn/qkv/kernel') must match a rule.
PARAM_RULES: tuple[tuple[str, Placement], ...] = (
    (TOKENS_AND_TABLES, "replicated"),
    (r"/(scale|bias)$", "tensor"),  # 1-D: gathering them every layer would cost more than they weigh
    (r"/kernel$", "tensor+fsdp"),
)


def parse_mesh(spec: str) -> dict[str, int]:
    """'data:-1,fsdp:2' -> {'data': -1, 'fsdp': 2, 'tensor': 1} (unnamed axes are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition(":")
        if not sep or name not in MESH_AXES:
            raise ValueError(f"--mesh: bad entry {item!r} in {spec!r}; expected NAME:SIZE with NAME in {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh: size of {name!r} must be an integer, got {value!r}") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"--mesh: size of {name!r} must be positive or -1, got {sizes[name]}")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"--mesh: at most one axis may be -1, got {spec!r}")
    return sizes


def make_mesh(spec: str = DEFAULT_MESH, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (or the given) devices, -1 taking the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec)
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if -1 in sizes.values():
        if len(devices) % known:
            raise ValueError(
                f"--mesh {spec!r}: the fixed axes ({known} devices) do not divide the {len(devices)} devices"
            )
        sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
    shape = tuple(sizes[a] for a in MESH_AXES)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"--mesh {spec!r} needs {int(np.prod(shape))} devices, but {len(devices)} are available")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the batch axes."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_global_batch(global_batch: int, mesh: Mesh, what: str = "global batch") -> None:
    """A clear error, before anything is compiled, when the batch does not split over the mesh's batch axes."""
    ways = batch_shards(mesh)
    if global_batch % ways:
        raise ValueError(
            f"the {what} of {global_batch} is not divisible by the {ways} batch shards of the mesh "
            f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); change --batch_size or --mesh"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data` and `fsdp`, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device of `mesh` holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def _rule_for(path: str) -> Placement:
    for pattern, placement in PARAM_RULES:
        if re.search(pattern, path):
            return placement
    raise ValueError(f"no rule in sharding.PARAM_RULES places parameter {path!r}")


def _tensor_axes(logical: PartitionSpec | None, ndim: int) -> list[str | None]:
    """'tensor' on the dimensions whose logical name LOGICAL_RULES sends there, else None."""
    names = tuple(logical) if logical is not None else (None,) * ndim
    rules = dict(LOGICAL_RULES)
    return ["tensor" if name is not None and rules.get(name) == "tensor" else None for name in names]


def param_spec(path: str, shape: Sequence[int], logical: PartitionSpec | None, mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec `PARAM_RULES` gives one parameter on `mesh`."""
    placement = _rule_for(path)
    if placement == "replicated":
        return PartitionSpec()
    axes = _tensor_axes(logical, len(shape))
    for i, axis in enumerate(axes):
        if axis is not None and shape[i] % mesh.shape[axis]:
            raise ValueError(f"--mesh: the {axis} axis of {mesh.shape[axis]} does not divide dimension {i} "
                             f"({logical[i]!r}, size {shape[i]}) of parameter {path}; choose a {axis} size that "
                             "divides the model's heads and MLP width")
    fsdp = mesh.shape["fsdp"]
    if placement == "tensor+fsdp" and fsdp > 1:
        free = [i for i, a in enumerate(axes) if a is None and shape[i] % fsdp == 0]
        if free:
            axes[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return PartitionSpec(*axes)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def param_specs(abstract_params: Any, logical_specs: Any, mesh: Mesh) -> Any:
    """A PartitionSpec per parameter; `logical_specs` is `nn.get_partition_spec` of the boxed init."""
    logical = flat_by_path(logical_specs, is_leaf=_is_spec)
    return map_with_path(lambda path, x: param_spec(path, x.shape, logical.get(path), mesh), abstract_params)


def specs_like_params(tree: Any, params_specs: Any, params_shapes: Any) -> Any:
    """PartitionSpecs for a tree (e.g. an optimizer state) that holds copies of the params.

    A leaf whose key path ends with a parameter's path and has its shape gets that
    parameter's spec (Adam's moments); anything else (step counts, scalars) is replicated.
    """
    specs = flat_by_path(params_specs, is_leaf=_is_spec)
    shapes = {path: x.shape for path, x in flat_by_path(params_shapes).items()}

    def spec(path: tuple, leaf: Any) -> PartitionSpec:
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        for start in range(len(keys)):
            candidate = "/".join(keys[start:])
            if candidate in specs and shapes[candidate] == getattr(leaf, "shape", None):
                return specs[candidate]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, tree)


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpec tree -> NamedSharding tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def describe(specs: Any) -> list[str]:
    """One line per parameter: 'path  spec', for the start-of-run log."""
    return [f"{path}  {spec}" for path, spec in flat_by_path(specs, is_leaf=_is_spec).items()]


def with_logical_rules(fn: Callable) -> Callable:
    """`fn` traced under `LOGICAL_RULES`, so the model's activation names bind to the mesh.

    Without the rules, Flax would pin every named activation to "replicated" as soon as
    a mesh is set; every function that applies a model under a mesh goes through this.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with nn.logical_axis_rules(LOGICAL_RULES):
            return fn(*args, **kwargs)

    return wrapped
