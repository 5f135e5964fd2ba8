"""What the jobs need from weight files that are not this project's checkpoints (`.pth`,
timm and transformers files): one reader object, which `cli.py` gets from the converter.
The library names the protocol only; it never imports `convert`."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

from semmae_jax.image_size import ImageSize
from semmae_jax.runtime.run_log import RunLog
from semmae_jax.training_length import TrainingLength


@dataclasses.dataclass(frozen=True)
class ResumeTarget:
    """What a restored file must fit: the model, and the run's length for continuing a `.pth` run.

    `betas` is the job's AdamW betas; None for a job whose optimizer is not AdamW (no
    `.pth` optimizer continues it).
    """

    model_name: str
    img_size: ImageSize
    length: TrainingLength
    betas: tuple[float, float] | None = None


class StatedModel(NamedTuple):
    """What a checkpoint states beyond its params (a transformers config, shapes, a saved meta)."""

    fields: dict[str, Any]  # model fields its numerics need (`layer_norm_eps`, `qkv_bias`), when not the default
    class_names: tuple[str, ...] | None  # the labels of its classes in id order (transformers' id2label)


class WeightsReader(Protocol):
    """Reads weight files of other frameworks for the jobs."""

    def params_for_model(self, path: str, model_name: str | None, img_size: ImageSize) -> Any:
        """Params of `path` as host arrays, checked against `model_name` (None: as saved), tables resized."""

    def continue_optimizer(self, state: Any, path: str, target: ResumeTarget, log: RunLog) -> Any | None:
        """`state` continued from the optimizer state of an original training file (its AdamW
        moments, its position in the run), or None for a file without one."""

    def encoder(self, path: str, img_size: ImageSize | None) -> tuple[Any, str, dict[str, Any]]:
        """A frozen ViT encoder (stage 1): (params, registered model name, overrides)."""

    def whole_model(self, path: str, img_size: ImageSize | None) -> tuple[Any, str, dict[str, Any]]:
        """The whole model as saved (decoder included): (params, registered model name, overrides)."""

    def params_as_saved(self, path: str, img_size: ImageSize) -> tuple[Any, StatedModel]:
        """Params of `path` as saved (tables resized) and what it says beyond them, in one read."""
