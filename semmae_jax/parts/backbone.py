"""The frozen feature extractor of stage 1: a ViT encoder without its head.

The part learner reads a self-supervised ViT's tokens after the final norm (iBOT ViT-S/16
in the paper; any DINO, iBOT or MAE encoder here), and the raw-attention baseline reads
the last block's attention from the cls token to the patches. Both come from one forward
pass of the project's own `VisionTransformer(num_classes=0, global_pool=False)`, whose
blocks sow their attention weights: nothing is re-implemented, so the features equal
timm's `forward_features` for the same weights.

Checkpoint files are not read here (the library never imports `convert`): a job gets the
encoder's params, with the registered model name and overrides they came from, from a
loader (`convert.reader.backbones.backbone_params`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

from semmae_jax.models import model_config
from semmae_jax.models.vit import VisionTransformer

# What a backbone keeps of its model's config: the encoder fields VisionTransformer shares
# with MaskedAutoencoderViT (not the head, the pooling or the decoder).
_ENCODER_FIELDS = {f.name for f in dataclasses.fields(VisionTransformer)} - {"parent", "name", "num_classes", "global_pool", "pooler"}


class BackboneFeatures(NamedTuple):
    """One batch's features: cls [B, D], patches [B, L, D] (after the final norm), cls_attention [B, H, L]."""

    cls: jax.Array
    patches: jax.Array
    cls_attention: jax.Array


def backbone_model(name: str, overrides: Mapping[str, Any] | None = None) -> VisionTransformer:
    """The encoder of registered model `name` (MAE or ViT) with `overrides`, headless and cls-pooled.

    Cls pooling keeps the final `norm`, so `tokens` returns the features after it.
    """
    config = model_config(name, **(overrides or {}))
    encoder = {k: v for k, v in config.items() if k in _ENCODER_FIELDS}
    return VisionTransformer(**encoder, num_classes=0, global_pool=False)


def last_cls_attention(intermediates: Mapping[str, Any], depth: int) -> jax.Array:
    """[B, H, L]: the last block's attention from the cls token to the patches (first call's)."""
    attention = intermediates[f"blocks_{depth - 1}"]["attn"]["attention"][0]
    return attention[:, :, 0, 1:]


def backbone_features(model: VisionTransformer, params: Any, images: jax.Array) -> BackboneFeatures:
    """Features of `images` [B, S, S, C] (normalised NHWC) from the frozen encoder.

    The params are wrapped in `stop_gradient`: whatever is differentiated through this,
    the backbone never learns.
    """
    tokens, state = model.apply(
        {"params": jax.lax.stop_gradient(params)}, images, method=VisionTransformer.tokens, mutable=["intermediates"]
    )
    return BackboneFeatures(tokens[:, 0], tokens[:, 1:], last_cls_attention(state["intermediates"], model.depth))
