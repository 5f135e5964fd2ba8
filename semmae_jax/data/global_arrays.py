"""Process-local numpy batches -> global `jax.Array`s sharded over the mesh's batch axes.

Each process holds rows [p * B, (p + 1) * B) of the global batch (the pipeline's
layout); `jax.make_array_from_process_local_data` stitches them into one array whose
leading dimension is split over `batch_axes` of the mesh.

Training batches arrive with uint8 images (a quarter of float32's bytes through
tf.data and the host -> device copy); `prefetch_to_device` normalises them on the
devices, right after the transfer, in one jitted function (ToTensor + ImageNet
Normalize, as torchvision), so the steps see float32 images as before.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from semmae_jax.data.imagenet import IMAGENET_MEAN_F32, IMAGENET_STD_F32
from semmae_jax.sharding import BATCH_AXES


@jax.jit
def normalize_on_device(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std, computed where `images` lives (sharding kept)."""
    return images.astype(jnp.float32) * (1 / (255 * IMAGENET_STD_F32)) - IMAGENET_MEAN_F32 / IMAGENET_STD_F32


def global_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES
) -> dict[str, jax.Array]:
    """Every array of `batch` as a global array, dimension 0 sharded over `batch_axes`."""
    sharding = NamedSharding(mesh, P(tuple(batch_axes)))
    return {name: jax.make_array_from_process_local_data(sharding, array) for name, array in batch.items()}


def _on_device(batch: Mapping[str, np.ndarray], mesh: Mesh, batch_axes: Sequence[str]) -> dict[str, jax.Array]:
    """`global_batch`, with a uint8 'image' normalised on the devices (float images pass as they are)."""
    arrays = global_batch(batch, mesh, batch_axes)
    if "image" in arrays and arrays["image"].dtype == jnp.uint8:
        arrays["image"] = normalize_on_device(arrays["image"])
    return arrays


def prefetch_to_device(
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    size: int = 2,
) -> Iterator[dict[str, jax.Array]]:
    """Each batch as global arrays (uint8 images normalised on device), `size` batches in flight.

    Transfers and the normalisation are asynchronous, so the copy of the next batches
    overlaps the step that consumes the current one.
    """
    batches = iter(batches)
    queue = collections.deque(_on_device(b, mesh, batch_axes) for b in itertools.islice(batches, size))
    while queue:
        queue.extend(_on_device(b, mesh, batch_axes) for b in itertools.islice(batches, 1))
        yield queue.popleft()
