"""Frozen ViT backbones for stage 1 (part learning) from any checkpoint the converter reads.

Stage 1 needs a ViT *encoder*: the cls token and the patch tokens after the final norm,
with no head and no decoder, as a `VisionTransformer(num_classes=0, global_pool=False)`.
Which files give one, and what is taken from each:

| checkpoint                                            | what is kept                          |
|-------------------------------------------------------|---------------------------------------|
| this project's MAE run or converted release (orbax)   | the encoder's params (decoder dropped)|
| MAE / SemMAE pretraining `.pth` (`{'model': ...}`)    | the encoder's keys                    |
| MAE encoder-only release, DINO release (flat dict)    | everything                            |
| iBOT release (`{'state_dict': ...}`)                  | everything                            |
| DINO / iBOT training file (`student`, `teacher`)      | the teacher's `backbone.*`            |
| cls-token classifier (`norm` + `head`)                | everything but the head               |
| transformers directory / `.safetensors` (any class)   | the encoder (`vit.*`, `embeddings.*`) |

Finding the state dict inside its wrapper, preferring the teacher, stripping `module.` /
`backbone.` and dropping the projection head and iBOT's `masked_embed` is the safe
loader's job (`convert.safe_load`, which never runs pickled code); this module keeps the
encoder's modules of what it returns and reports everything it left out. A global-pool
classifier (`fc_norm`, no `norm`) is refused: its tokens never went through a final norm,
so they are not the features a part learner is trained on.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convert.core import params_from_checkpoint, torch_to_flax
from convert.hf_files import is_hf_source
from convert.safe_load import load_torch_checkpoint
from convert.table import ConversionError, flatten, unflatten
from semmae_jax.image_size import ImageSize
from semmae_jax.models import model_family

log = logging.getLogger(__name__)

# Top-level modules of a ViT encoder, in both layouts ('blocks.3.' in torch, 'blocks_3/' in Flax).
ENCODER_MODULES = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")


def _module_of(name: str, separator: str) -> str:
    """'blocks.3.attn.qkv.weight' (torch) or 'blocks_3/attn/qkv/kernel' (Flax) -> 'blocks'."""
    return re.sub(r"_\d+$", "", name.split(separator)[0])


def encoder_only(arrays: Mapping[str, Any], separator: str) -> tuple[OrderedDict[str, Any], list[str]]:
    """The encoder's entries of a flat state dict or params dict, and the names left out.

    `separator` is '.' for torch keys and '/' for Flax paths. Raises `ConversionError`
    when there is no final `norm` (a global-pool classifier, or not a ViT at all).
    """
    kept = OrderedDict((k, v) for k, v in arrays.items() if _module_of(k, separator) in ENCODER_MODULES)
    dropped = [k for k in arrays if k not in kept]
    if not any(_module_of(k, separator) == "norm" for k in kept):
        pooled = any(_module_of(k, separator) == "fc_norm" for k in arrays)
        why = "a global-pool classifier (fc_norm): its tokens have no final norm" if pooled else "no final 'norm'"
        raise ConversionError(f"not usable as a frozen backbone: {why}; use a pretraining or encoder checkpoint")
    return kept, dropped


def backbone_state_dict(source: str | Path | Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """The torch-layout encoder state dict of a `.pth` file (or of an unwrapped state dict).

    A file is read by the safe loader (wrappers, teacher, prefixes, heads handled there);
    then only the encoder's keys are kept.
    """
    if isinstance(source, Mapping):
        state_dict = source
    else:
        state_dict, info = load_torch_checkpoint(source)
        log.info("%s", info.summary())
    encoder, dropped = encoder_only(state_dict, ".")
    if dropped:
        log.info("backbone: left out %d entries not in the encoder (e.g. %s)", len(dropped), dropped[0])
    return encoder


def backbone_params(path: str | Path, img_size: ImageSize | None = None) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(encoder params, model name, overrides) from a `.pth` file, an orbax checkpoint, or a
    transformers directory / `.safetensors` file (read by `convert.read_checkpoint`).

    The name and overrides are the converter's usual currency: the model the encoder
    came from (an MAE pretraining model for this project's runs, a ViT otherwise);
    `semmae_jax.parts.backbone_model(name, overrides)` builds the headless encoder that
    runs the params. With `img_size` the position table is resampled (bicubic, as MAE's
    `interpolate_pos_embed`) to that input size.
    """
    if Path(path).is_dir() or is_hf_source(path):
        params, name, overrides = params_from_checkpoint(path, img_size=img_size)
        encoder, dropped = encoder_only(flatten(params), "/")
        if dropped:
            log.info("backbone %s: left out %d params of the %s model", path, len(dropped), model_family(name))
        return unflatten(encoder), name, overrides
    return torch_to_flax(backbone_state_dict(path), img_size=img_size)
