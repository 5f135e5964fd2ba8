"""SemMAE ViT-B/8 on the original's records: 196 of the 784 patch positions per image.

    python main.py parts import-semmae SEMMAE_RECORDS $PARTS
    python main.py pretrain --config semmae_vit_base_patch8_196 --data_path $IMAGENET --part_path $PARTS

The original's patch-8 data (its `.npy` records, one per training image) holds 196 grid positions
of the 28 x 28 and their pixels; its model saw those tokens only, at their position-table rows,
with a horizontal flip as the only augmentation. `parts import-semmae` turns each record into a
28 x 28 part map whose labelled positions are exactly the record's; `--labelled_tokens 196` trains
on them: the whole image at 224 (no crop), flipped half the time, the 196 labelled patches (75 %
of them masked, by SemMAE's schedule over their parts), the rest of the grid unseen. Otherwise the
ViT-B/16 recipe (`semmae_vit_base_patch16`); `semmae_vit_base_patch8` trains on the full grid.
"""

import dataclasses

from configs.semmae_vit_base_patch8 import get_config as full_grid_config
from semmae_jax.jobs.pretrain import PretrainConfig


def get_config() -> PretrainConfig:
    return dataclasses.replace(full_grid_config(), labelled_tokens=196,
                               output_dir="./output_semmae_vit_base_patch8_196")
