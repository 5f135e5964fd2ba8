"""Encoder features of a dataset: what `main.py features` writes and `main.py knn` scores.

The features are the encoder's tokens after its final norm, with no masking (timm's
`forward_features` of a cls-token ViT; what the linear probe reads), taken as `tokens`
says: 'cls', the cls token, `forward_features(x)[:, 0]`; 'mean', the mean of the patch
tokens, `forward_features(x)[:, 1:].mean(1)` (no further norm: not a global-pool
classifier's `fc_norm`, which a pretraining checkpoint does not have); 'patch', the patch
tokens as a map [H/p, W/p, D], channels last. With `layers`, the outputs of those blocks
(0-based, before the final norm: timm's `forward_intermediates(x, indices=layers,
norm=False)`, what ViTDet's and UperNet's necks read) are taken the same way. The encoder
is `parts.backbone.backbone_model` (the project's `VisionTransformer`, headless and
cls-pooled), so nothing here re-implements a ViT.

Extraction runs on the mesh: params placed by the sharding rules, each global batch split
over the batch axes, every process reading its contiguous share of the split
(`EvalLoader`). Every process ends with all features in the source's order, each image
once (padding and unreadable images left out, the latter named in the loader's warnings).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semmae_jax import sharding
from semmae_jax.data.bands import Bands
from semmae_jax.data.global_arrays import global_batch
from semmae_jax.models.vit import VisionTransformer
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.runtime.host_memory import available_host_bytes

Tokens = Literal["cls", "mean", "patch"]
TOKENS: tuple[Tokens, ...] = ("cls", "mean", "patch")
VECTORS: tuple[Tokens, ...] = ("cls", "mean")  # one vector per image: what k-NN and the probe read


class Features(NamedTuple):
    """One split's features, in the source's order."""

    features: np.ndarray  # float32 [N, D] ('cls', 'mean') or [N, H/p, W/p, D] ('patch')
    labels: np.ndarray  # int64 [N]
    file_names: np.ndarray  # str [N]
    layers: np.ndarray | None = None  # float32 [N, len(layer_indices), ...] as `features`: the chosen blocks'
    layer_indices: np.ndarray | None = None  # int64: which blocks (0-based)


REQUIRED = ("features", "labels", "file_names")  # what every features file holds


def select_tokens(tokens: jax.Array, which: Tokens, grid: tuple[int, int]) -> jax.Array:
    """[B, 1 + L, D] tokens -> the cls token [B, D], the patch tokens' mean [B, D], or their map [B, h, w, D]."""
    if which == "cls":
        return tokens[:, 0]
    if which == "mean":
        return tokens[:, 1:].mean(axis=1)
    if which == "patch":
        return tokens[:, 1:].reshape(tokens.shape[0], *grid, tokens.shape[-1])
    raise ValueError(f"--tokens must be one of {TOKENS}, got {which!r}")


def check_layers(model: VisionTransformer, layers: Sequence[int]) -> None:
    """Block indices must name blocks of `model`, each once."""
    wrong = [i for i in layers if not 0 <= i < model.depth]
    if wrong or len(set(layers)) != len(layers):
        raise ValueError(f"--layers {','.join(map(str, layers))}: give distinct block indices 0..{model.depth - 1} "
                         f"(this encoder has {model.depth} blocks)")


def encode(model: VisionTransformer, params: Any, images: jax.Array, tokens: Tokens,
           layers: Sequence[int] = ()) -> tuple[jax.Array, jax.Array | None]:
    """Float32 features of normalised NHWC `images` (no masking, no dropout): those of the final
    tokens after the norm, and those of blocks `layers` before it, stacked on axis 1 (None without)."""
    grid = model.grid_hw
    wanted = {f"blocks_{i}" for i in layers}
    final, state = model.apply({"params": params}, images, method=VisionTransformer.tokens,
                               capture_intermediates=lambda module, method: method == "__call__" and module.name in wanted)
    length = final.shape[1]  # a block's output may carry one padding token (`apply_blocks`)
    taken = [select_tokens(state["intermediates"][f"blocks_{i}"]["__call__"][0][:, :length], tokens, grid)
             for i in layers]
    stacked = jnp.stack(taken, axis=1).astype(jnp.float32) if taken else None
    return select_tokens(final, tokens, grid).astype(jnp.float32), stacked


def place_params(model: VisionTransformer, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """`params` on `mesh` as the sharding rules place the model's params."""
    images = jnp.zeros((1, *model.image_hw, model.in_chans), jnp.float32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]
    specs = sharding.param_specs(nn.unbox(boxed), nn.get_partition_spec(boxed), mesh)
    return jax.device_put(params, sharding.named(mesh, specs))


def extract(model: VisionTransformer, params: Any, source: Any, *, tokens: Tokens, batch: BatchGeometry,
            mesh: jax.sharding.Mesh, layers: Sequence[int] = (), num_workers: int | None = None,
            bands: Bands | None = None) -> tuple[Features, list[str]]:
    """Features of every example of `source` (`EvalTransform` at the model's size).

    Args:
      tokens, layers: which tokens, of the final norm's output and of which blocks (`encode`).
      batch: the batch at every scope (each process reads its share, the mesh's batch axes split the global one).
      bands: how images that are not 8-bit RGB are read (`data.bands`).

    Returns:
      (features in the source's order, names of the images that could not be read).
    """
    from semmae_jax import data

    check_layers(model, layers)
    sharding.check_global_batch(batch.global_batch, mesh, "feature batch")
    check_host_memory(model, tokens, len(layers), source.num_examples)
    loader = data.EvalLoader(source, process_batch=batch.per_process,
                             transform=data.EvalTransform(model.img_size, bands=bands), num_workers=num_workers)
    placed = place_params(model, params, mesh)

    @sharding.with_logical_rules
    def step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array | None]:
        final, chosen = encode(model, params, batch["image"], tokens, layers)
        return {"features": final, "layers": chosen, "label": batch["label"], "mask": batch["mask"]}

    step = jax.jit(step, out_shardings=sharding.replicated(mesh))
    rows = [jax.tree.map(np.asarray, step(placed, global_batch(batch, mesh)))
            for batch in _progress(loader.batches(), loader.num_batches)]
    stacked = jax.tree.map(lambda *column: np.concatenate(column), *rows)  # "layers" stays None without layers
    present = stacked["mask"]
    ids = row_ids(source.num_examples, loader.process_batch, batch.processes)
    kept = np.flatnonzero(present)[np.argsort(ids[present])]  # the rows read, in the source's order
    names = all_names(source)
    found = Features(stacked["features"][kept], stacked["label"][kept].astype(np.int64),
                     np.asarray([names[i] for i in ids[kept]], str),
                     stacked["layers"][kept] if layers else None, np.asarray(layers, np.int64) if layers else None)
    return found, [names[i] for i in ids[~present & (ids >= 0)]]


def check_host_memory(model: VisionTransformer, tokens: Tokens, num_layers: int, num_examples: int) -> None:
    """Refuse, before any image is read, features that would not fit in the host's free memory
    (every process holds them all: patch-token maps of many blocks are large)."""
    per_image = (model.num_patches if tokens == "patch" else 1) * model.embed_dim * 4 * (1 + num_layers)
    needed, free = per_image * num_examples, available_host_bytes()
    if free is not None and needed > free:
        raise ValueError(f"the features of {num_examples} images ({tokens} tokens of {1 + num_layers} outputs) take "
                         f"{needed / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of free host memory: "
                         "fewer --layers, --tokens cls or mean, or a smaller split")


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
    """`found` as an `.npz` with arrays `features`, `labels`, `file_names` (and `layers`, `layer_indices`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: value for name, value in found._asdict().items() if value is not None}
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)


def load_features(path: str | Path) -> Features:
    """An `.npz` that `save_features` wrote; a clear error naming the file for anything else."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            missing = [name for name in REQUIRED if name not in stored.files]
            if missing:
                raise ValueError(f"{path} lacks {missing}: not a `main.py features` output")
            found = Features(*(stored[name] if name in stored.files else None for name in Features._fields))
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz of features ({error}); write one with main.py features") from error
    if len(found.features) != len(found.labels):
        raise ValueError(f"{path}: features {found.features.shape} and labels {found.labels.shape} do not pair up")
    return found
