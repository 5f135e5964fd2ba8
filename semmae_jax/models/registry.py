"""Model names, as the original's factories (`mae_vit_base_patch16`, `vit_base_patch16`),
plus small ones for tests and the demo.

`create_model(name, **overrides)` builds the Flax module; overrides are checked
against the module's fields so a misspelt one is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from semmae_jax.image_size import height_width, image_size, size_text
from semmae_jax.models.layers import ATTENTION_IMPLEMENTATIONS, remat_policy
from semmae_jax.models.mae import FROZEN_PARAMS, MaskedAutoencoderViT
from semmae_jax.models.vit import VisionTransformer

Family = Literal["mae", "vit"]
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
_HUGE = dict(embed_dim=1280, depth=32, num_heads=16)
_TEST = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4)
_DEMO = dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4)

_FAMILIES: dict[str, type[nn.Module]] = {"mae": MaskedAutoencoderViT, "vit": VisionTransformer}
_MODELS: dict[str, tuple[Family, dict[str, Any]]] = {
    # MAE / SemMAE pretraining models.
    "mae_vit_base_patch16": ("mae", dict(patch_size=16, **_BASE, **_DECODER)),
    "mae_vit_large_patch16": ("mae", dict(patch_size=16, **_LARGE, **_DECODER)),
    "mae_vit_huge_patch14": ("mae", dict(patch_size=14, **_HUGE, **_DECODER)),
    "mae_vit_base_patch8": ("mae", dict(patch_size=8, **_BASE, **_DECODER)),
    "mae_vit_large_patch8": ("mae", dict(patch_size=8, **_LARGE, **_DECODER)),
    "mae_vit_demo_patch8": ("mae", dict(**_DEMO, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)),
    "mae_vit_test_patch4": ("mae", dict(**_TEST, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)),
    # Classifiers for fine-tuning, linear probing and evaluation.
    "vit_base_patch16": ("vit", dict(patch_size=16, **_BASE)),
    "vit_large_patch16": ("vit", dict(patch_size=16, **_LARGE)),
    "vit_huge_patch14": ("vit", dict(patch_size=14, **_HUGE)),
    "vit_base_patch8": ("vit", dict(patch_size=8, **_BASE)),
    "vit_large_patch8": ("vit", dict(patch_size=8, **_LARGE)),
    "vit_demo_patch8": ("vit", dict(**_DEMO, num_classes=10)),
    "vit_test_patch4": ("vit", dict(**_TEST, num_classes=10)),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_names(family: Family | None = None) -> list[str]:
    """Registered names, optionally of one family ('mae' pretraining or 'vit' classifier)."""
    return [name for name, (fam, _) in _MODELS.items() if family in (None, fam)]


def model_family(name: str) -> Family:
    """Which kind of model a registered name builds (MAE or classifier)."""
    return _lookup(name)[0]


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of `name` with `overrides` applied and validated."""
    family, config = _lookup(name)
    fields = {f.name for f in dataclasses.fields(_FAMILIES[family])} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {unknown}; known: {sorted(fields)}")
    config = {**config, **overrides}
    if isinstance(config.get("dtype"), str):
        if config["dtype"] not in _DTYPES:
            raise ValueError(f"unknown dtype {config['dtype']!r}; choose from {sorted(_DTYPES)}")
        config["dtype"] = _DTYPES[config["dtype"]]
    if config.get("attention", "xla") not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention {config['attention']!r}; choose from {list(ATTENTION_IMPLEMENTATIONS)}")
    remat_policy(config.get("remat", False))
    if "img_size" in config:  # a JSON list from a saved config or checkpoint is the same size
        config["img_size"] = image_size(config["img_size"])
        if any(side % config["patch_size"] for side in height_width(config["img_size"])):
            raise ValueError(f"image size {size_text(config['img_size'])} is not a multiple of the patch size "
                             f"{config['patch_size']} of model {name}")
    return config


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model `name`, e.g. `create_model('vit_base_patch16', num_classes=100)`.

    Overrides are any field of the module: `img_size`, `num_classes`, `global_pool`,
    `drop_path_rate`, `dtype` ('float32' / 'bfloat16' or a jnp dtype), `norm_pix_loss`,
    `remat` (a policy of `layers.REMAT_POLICIES`, or a bool: 'full' or 'none'), `attention` ('xla',
    the default, or 'cudnn': cuDNN flash attention, NVIDIA GPUs in bfloat16/float16; refused with
    the reason elsewhere when the model is traced), ...
    """
    family, _ = _lookup(name)
    return _FAMILIES[family](**model_config(name, **overrides))


def frozen_param_names(model: nn.Module) -> tuple[str, ...]:
    """Top-level parameters that are fixed during training (MAE's sin-cos tables)."""
    return FROZEN_PARAMS if isinstance(model, MaskedAutoencoderViT) else ()


def layer_id(path: str, depth: int) -> int:
    """MAE's `get_layer_id_for_vit` on a Flax param path: the 'layer' it belongs to for layer-wise
    lr decay (0 for the embeddings, i + 1 for block i, depth + 1 for the rest)."""
    top = path.split("/")[0]
    if top in ("cls_token", "pos_embed", "patch_embed", "mask_token"):
        return 0
    block = re.fullmatch(r"blocks_(\d+)", top)
    return int(block.group(1)) + 1 if block else depth + 1


def _lookup(name: str) -> tuple[Family, dict[str, Any]]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(_MODELS)}")
    return _MODELS[name]
