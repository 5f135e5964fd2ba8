"""SemMAE ViT-B/8 (800 epochs), as far as the release shows it.

    python main.py pretrain --config semmae_vit_base_patch8 --data_path $IMAGENET --part_path $PARTS

The release gives the patch-8 fine-tuned result (84.44 top-1; paper 84.5) but no
pretraining command; this preset is the ViT-B/16 recipe with 8 x 8 patches (784 tokens).
Note: the original's patch-8 data fed only 196 of the 784 grid positions per image (its
`.npy` records, see `parts import-semmae`); this preset trains on the full grid, and
`semmae_vit_base_patch8_196` on the records' 196 positions.
"""

import dataclasses

from configs.semmae_vit_base_patch16 import get_config as base_config
from semmae_jax.jobs.pretrain import PretrainConfig


def get_config() -> PretrainConfig:
    return dataclasses.replace(base_config(), model="mae_vit_base_patch8", output_dir="./output_semmae_vit_base_patch8")
