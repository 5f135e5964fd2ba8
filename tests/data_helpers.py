"""Batches the data tests read without a training job: the pipeline's loader, endless, in one process."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from semmae_jax.data import TrainLoader, TrainTransform, image_folder
from semmae_jax.data.transforms import normalize


def pretrain_batches(data_path: str | Path, part_path: str | Path | None = None, *, batch_size: int,
                     img_size: int = 224, patch_size: int = 16, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless single-process pretraining batches of an image folder's train split: epoch 0, 1, ...

    {'image': float32 [B, img_size, img_size, 3] normalised, 'part_labels': int32 [B, L]}, L =
    (img_size / patch_size)^2, -1 where a patch has no part (all -1 without `part_path`). The
    folder is listed (and errors raised) on the call, not on the first `next`.
    """
    loader = TrainLoader(image_folder(data_path, "train", part_path), process_batch=batch_size,
                         transform=TrainTransform(img_size=img_size, patch_size=patch_size), seed=seed,
                         process_index=0, process_count=1)

    def endless() -> Iterator[dict[str, np.ndarray]]:
        for epoch in itertools.count():
            for batch in loader.epoch_batches(epoch):
                yield {"image": normalize(batch["image"]).numpy(), "part_labels": batch["part_labels"]}

    return endless()
