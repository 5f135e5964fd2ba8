"""Stage 1 of SemMAE: semantic parts learned on a frozen self-supervised ViT.

    backbone_model(name, overrides), backbone_features(model, params, images)  # frozen encoder
    PartLearner, PartModel, build_part_model, assign_parts, frozen_backbone   # the learner
    LossWeights, part_losses                                                  # its losses
    fit_kmeans, kmeans_parts, attention_parts                                 # the baselines
    part_scores                                                               # mIoU / ARI vs truth

The jobs: `semmae_jax.jobs.parts` (train) and `semmae_jax.jobs.parts_tools` (export, show, eval).
"""

from semmae_jax.parts.backbone import BackboneFeatures, backbone_features, backbone_model, last_cls_attention
from semmae_jax.parts.baselines import attention_parts, fit_kmeans, kmeans_parts
from semmae_jax.parts.learner import (
    PartLearner,
    PartModel,
    PartOutputs,
    assign_parts,
    build_part_model,
    frozen_backbone,
    gaussian_blur,
)
from semmae_jax.parts.losses import LossWeights, part_losses
from semmae_jax.parts.metrics import PartScores, part_scores

__all__ = [
    "BackboneFeatures",
    "LossWeights",
    "PartLearner",
    "PartModel",
    "PartOutputs",
    "PartScores",
    "assign_parts",
    "attention_parts",
    "backbone_features",
    "backbone_model",
    "build_part_model",
    "fit_kmeans",
    "frozen_backbone",
    "gaussian_blur",
    "kmeans_parts",
    "last_cls_attention",
    "part_losses",
    "part_scores",
]
