"""Encoder features of a dataset: what `main.py features` writes and `main.py knn` scores.

The features are the encoder's tokens after its final norm, with no masking (timm's
`forward_features` of a cls-token ViT; what the linear probe reads), pooled: 'cls', the
cls token, `forward_features(x)[:, 0]`; 'mean', the mean of the patch tokens,
`forward_features(x)[:, 1:].mean(1)` (no further norm: not a global-pool classifier's
`fc_norm`, which a pretraining checkpoint does not have). The encoder is
`parts.backbone.backbone_model` (the project's `VisionTransformer`, headless and
cls-pooled), so nothing here re-implements a ViT.

Extraction runs on the mesh: params placed by the sharding rules, each global batch split
over the batch axes, every process reading its contiguous share of the split
(`EvalLoader`). Every process ends with all features in the source's order, each image
once (padding and unreadable images left out, the latter named in the loader's warnings).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semmae_jax import sharding
from semmae_jax.data.global_arrays import global_batch
from semmae_jax.models.vit import VisionTransformer
from semmae_jax.runtime.batch_geometry import BatchGeometry

Pool = Literal["cls", "mean"]
POOLS: tuple[Pool, ...] = ("cls", "mean")


class Features(NamedTuple):
    """One split's features, in the source's order."""

    features: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # int64 [N]
    file_names: np.ndarray  # str [N]


def pool_tokens(tokens: jax.Array, pool: Pool) -> jax.Array:
    """[B, 1 + L, D] tokens after the final norm -> [B, D]: the cls token, or the mean of the patch tokens."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(axis=1)
    raise ValueError(f"--pool must be one of {POOLS}, got {pool!r}")


def encode(model: VisionTransformer, params: Any, images: jax.Array, pool: Pool) -> jax.Array:
    """Pooled float32 features [B, D] of normalised NHWC `images` (no masking, no dropout)."""
    tokens = model.apply({"params": params}, images, method=VisionTransformer.tokens)
    return pool_tokens(tokens, pool).astype(jnp.float32)


def place_params(model: VisionTransformer, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """`params` on `mesh` as the sharding rules place the model's params."""
    images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]
    specs = sharding.param_specs(nn.unbox(boxed), nn.get_partition_spec(boxed), mesh)
    return jax.device_put(params, sharding.named(mesh, specs))


def extract(model: VisionTransformer, params: Any, source: Any, *, pool: Pool, batch: BatchGeometry,
            mesh: jax.sharding.Mesh, num_workers: int | None = None) -> tuple[Features, list[str]]:
    """Features of every example of `source` (`EvalTransform` at the model's size).

    Args:
      batch: the batch at every scope (each process reads its share, the mesh's batch axes split the global one).

    Returns:
      (features in the source's order, names of the images that could not be read).
    """
    from semmae_jax import data

    sharding.check_global_batch(batch.global_batch, mesh, "feature batch")
    loader = data.EvalLoader(source, process_batch=batch.per_process,
                             transform=data.EvalTransform(model.img_size), num_workers=num_workers)
    placed = place_params(model, params, mesh)

    @sharding.with_logical_rules
    def step(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        return encode(model, params, batch["image"], pool), batch["label"], batch["mask"]

    step = jax.jit(step, out_shardings=(sharding.replicated(mesh),) * 3)
    rows = [tuple(np.asarray(x) for x in step(placed, global_batch(batch, mesh)))
            for batch in _progress(loader.batches(), loader.num_batches)]
    features, labels, present = (np.concatenate(column) for column in zip(*rows, strict=True))
    ids = row_ids(source.num_examples, loader.process_batch, batch.processes)
    kept = np.flatnonzero(present)[np.argsort(ids[present])]  # the rows read, in the source's order
    names = all_names(source)
    found = Features(features[kept], labels[kept].astype(np.int64), np.asarray([names[i] for i in ids[kept]], str))
    return found, [names[i] for i in ids[~present & (ids >= 0)]]


def row_ids(num_examples: int, per_process: int, processes: int) -> np.ndarray:
    """The example id of each row of the evaluation batches stacked (-1: padding).

    Global batch k holds, at slots [p * B, (p + 1) * B), rows k * B .. (k + 1) * B - 1 of
    process p's share (`eval_share`: contiguous in the source's order), padded at its end.
    """
    from semmae_jax.data.sources import Shard, eval_share

    shares = [np.arange(*eval_share(num_examples, Shard(p, processes))) for p in range(processes)]
    num_batches = -(-max(len(share) for share in shares) // per_process)
    ids = np.full((processes, num_batches * per_process), -1, np.int64)
    for p, share in enumerate(shares):
        ids[p, : len(share)] = share
    return ids.reshape(processes, num_batches, per_process).transpose(1, 0, 2).reshape(-1)


def all_names(source: Any) -> list[str]:
    """The name of every example of `source`, in its order (file names for folders and packed data)."""
    from semmae_jax.data.sources import Shard

    stream = source.eval_stream(Shard(0, 1))
    return [stream.name(pos) for pos in range(stream.length)]


def _progress(batches: Iterator[dict[str, np.ndarray]], total: int) -> Iterator[dict[str, np.ndarray]]:
    from tqdm import tqdm

    from semmae_jax.runtime.distributed import is_primary

    return tqdm(batches, total=total, desc="features", disable=not is_primary(), dynamic_ncols=True)


def save_features(path: str | Path, found: Features) -> None:
    """`found` as an `.npz` with arrays `features`, `labels`, `file_names`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        np.savez(stream, features=found.features, labels=found.labels, file_names=found.file_names)


def load_features(path: str | Path) -> Features:
    """An `.npz` that `save_features` wrote; a clear error naming the file for anything else."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            missing = [name for name in Features._fields if name not in stored.files]
            if missing:
                raise ValueError(f"{path} lacks {missing}: not a `main.py features` output")
            found = Features(*(stored[name] for name in Features._fields))
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz of features ({error}); write one with main.py features") from error
    if found.features.ndim != 2 or len(found.features) != len(found.labels):
        raise ValueError(f"{path}: features {found.features.shape} and labels {found.labels.shape} do not pair up")
    return found
