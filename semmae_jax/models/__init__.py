"""Flax models: the MAE pretraining model, the ViT classifier, and their registry."""

from semmae_jax.models.mae import MaskedAutoencoderViT, patchify, random_masking, unpatchify
from semmae_jax.models.registry import (
    create_model,
    frozen_param_names,
    layer_id,
    model_config,
    model_family,
    model_names,
)
from semmae_jax.models.vit import VisionTransformer

__all__ = [
    "MaskedAutoencoderViT",
    "VisionTransformer",
    "create_model",
    "frozen_param_names",
    "layer_id",
    "model_config",
    "model_family",
    "model_names",
    "patchify",
    "random_masking",
    "unpatchify",
]
