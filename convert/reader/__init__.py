"""The converter as the jobs' `semmae_jax.checkpoint.WeightsReader`.

`cli.py` hands one `ConverterReader` to every job that takes checkpoints (`--resume`,
`--finetune`, `parts train --backbone`, `eval`); the jobs call its methods and never
import `convert`. Reading is as safe as the converter's: no pickle code runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.core import params_from_checkpoint, read_checkpoint
from convert.reader.adam_continuation import continue_adam_run
from convert.reader.backbones import backbone_params
from convert.reader.optimizer import torch_adam_state
from semmae_jax.checkpoint import ResumeTarget, StatedModel
from semmae_jax.image_size import ImageSize
from semmae_jax.runtime.run_log import RunLog

# Model fields that change what a model computes from the same params, read from checkpoints.
NUMERICS_FIELDS = ("layer_norm_eps", "qkv_bias")


class ConverterReader:
    """`.pth` files (and orbax checkpoints) read through the converter."""

    def params_for_model(self, path: str, model_name: str | None, img_size: ImageSize) -> Any:
        """Params checked against `model_name` (or as saved, when None), position tables resized to `img_size`."""
        params, _, _ = params_from_checkpoint(path, model_name, img_size=img_size)
        return params

    def continue_optimizer(self, state: Any, path: str, target: ResumeTarget, log: RunLog) -> Any | None:
        """`state` continued from the AdamW state of an original pretraining or fine-tuning `.pth`
        (None for a file without one, and for directories)."""
        adam = None if Path(path).is_dir() else torch_adam_state(path, target.model_name)
        return None if adam is None else continue_adam_run(state, adam, path, target, log)

    def encoder(self, path: str, img_size: ImageSize | None) -> tuple[Any, str, dict[str, Any]]:
        """A frozen ViT encoder for stage 1: (params, registered model name, overrides)."""
        return backbone_params(path, img_size=img_size)

    def whole_model(self, path: str, img_size: ImageSize | None) -> tuple[Any, str, dict[str, Any]]:
        """The whole model as saved (decoder included): (params, registered model name, overrides)."""
        return params_from_checkpoint(path, None, img_size=img_size)

    def params_as_saved(self, path: str, img_size: ImageSize) -> tuple[Any, StatedModel]:
        """The params as saved (position tables resized to `img_size`) and, from the same read,
        the numerics fields the file states (a hub config's eps 1e-12, q, k, v without biases)
        and its class names (a transformers classifier's id2label, in id order)."""
        loaded = read_checkpoint(path, img_size=img_size)
        labels = loaded.meta.get("id2label")
        names = tuple(labels[k] for k in sorted(labels, key=int)) if labels else None
        fields = {k: loaded.overrides[k] for k in NUMERICS_FIELDS if k in loaded.overrides}
        return loaded.params, StatedModel(fields, names)
