"""Input data: sources (image folders, TFDS), transforms with part maps, tf.data pipelines.

Names are resolved lazily so that `semmae_jax.data.part_maps` and `demo` can be used
without paying for TensorFlow's start-up.

    open_source(data_path, split, *, dataset='folder'|'tfds:NAME', tfds_data_dir, part_path, missing_parts)
    TrainLoader(source, *, process_batch, transform, seed, num_workers, process_index, process_count)
        .steps_per_epoch, .epoch_batches(epoch, start_step=0), .skipped
    EvalLoader(source, *, process_batch, transform, ...).num_batches, .batches(); eval_batches(...)
    TrainTransform(img_size, patch_size, ...), EvalTransform(img_size, crop_pct=0.875),
    WholeImageTransform(img_size, patch_size, hflip) (stage 1: no crop)
    global_batch(batch, mesh, batch_axes), prefetch_to_device(batches, mesh, batch_axes, size=2)
    demo_data(cache_dir=None) -> Path
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from semmae_jax.data.datasets import open_source
    from semmae_jax.data.demo import demo_data
    from semmae_jax.data.global_arrays import global_batch, prefetch_to_device
    from semmae_jax.data.pipeline import EvalLoader, TrainLoader, eval_batches
    from semmae_jax.data.sources import image_folder
    from semmae_jax.data.transforms import EvalTransform, TrainTransform, WholeImageTransform

_EXPORTS = {
    "demo_data": "demo",
    "global_batch": "global_arrays",
    "prefetch_to_device": "global_arrays",
    "EvalLoader": "pipeline",
    "TrainLoader": "pipeline",
    "eval_batches": "pipeline",
    "image_folder": "sources",
    "open_source": "datasets",
    "EvalTransform": "transforms",
    "TrainTransform": "transforms",
    "WholeImageTransform": "transforms",
}
__all__ = [  # noqa: RUF022  (grouped as _EXPORTS)
    "demo_data",
    "global_batch",
    "prefetch_to_device",
    "EvalLoader",
    "TrainLoader",
    "eval_batches",
    "image_folder",
    "open_source",
    "EvalTransform",
    "TrainTransform",
    "WholeImageTransform",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
