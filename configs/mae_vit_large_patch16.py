"""MAE ViT-L/16 pretraining, MAE's PRETRAIN.md recipe (its recommended default).

    python main.py pretrain --config mae_vit_large_patch16 --data_path $IMAGENET

Same hyper-parameters as `mae_vit_base_patch16` (effective batch 4096). MAE's fine-tuned
top-1 on ImageNet-1k: 85.9.
"""

import dataclasses

from configs.mae_vit_base_patch16 import get_config as base_config
from semmae_jax.jobs.pretrain import PretrainConfig


def get_config() -> PretrainConfig:
    return dataclasses.replace(base_config(), model="mae_vit_large_patch16", output_dir="./output_mae_vit_large_patch16")
