"""MAE ViT-H/14 pretraining, MAE's PRETRAIN.md recipe.

    python main.py pretrain --config mae_vit_huge_patch14 --data_path $IMAGENET

Same hyper-parameters as `mae_vit_base_patch16` (effective batch 4096); on accelerators
consider `--dtype bfloat16 --remat` and an FSDP mesh (`--mesh data:-1,fsdp:8`, see the
docs/benchmarks.md's memory table). MAE's fine-tuned top-1 on ImageNet-1k: 86.9.
"""

import dataclasses

from configs.mae_vit_base_patch16 import get_config as base_config
from semmae_jax.jobs.pretrain import PretrainConfig


def get_config() -> PretrainConfig:
    return dataclasses.replace(base_config(), model="mae_vit_huge_patch14", output_dir="./output_mae_vit_huge_patch14")
