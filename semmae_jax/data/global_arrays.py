"""Process-local numpy batches -> global `jax.Array`s sharded over the mesh's batch axes.

Each process holds rows [p * B, (p + 1) * B) of the global batch (the pipeline's
layout); `jax.make_array_from_process_local_data` stitches them into one array whose
leading dimension is split over `batch_axes` of the mesh.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_BATCH_AXES = ("data", "fsdp")


def global_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, batch_axes: Sequence[str] = DEFAULT_BATCH_AXES
) -> dict[str, jax.Array]:
    """Every array of `batch` as a global array, dimension 0 sharded over `batch_axes`."""
    sharding = NamedSharding(mesh, P(tuple(batch_axes)))
    return {name: jax.make_array_from_process_local_data(sharding, array) for name, array in batch.items()}


def prefetch_to_device(
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh,
    batch_axes: Sequence[str] = DEFAULT_BATCH_AXES,
    size: int = 2,
) -> Iterator[dict[str, jax.Array]]:
    """`global_batch` of each batch, keeping `size` batches in flight to the devices.

    Transfers are asynchronous, so the copy of the next batches overlaps the step that
    consumes the current one.
    """
    batches = iter(batches)
    queue = collections.deque(global_batch(b, mesh, batch_axes) for b in itertools.islice(batches, size))
    while queue:
        queue.extend(global_batch(b, mesh, batch_axes) for b in itertools.islice(batches, 1))
        yield queue.popleft()
