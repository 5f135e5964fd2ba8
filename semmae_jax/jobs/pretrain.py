"""MAE / SemMAE pretraining: `python main.py pretrain [flags]`.

With no flags it runs the embedded demo (`configs/demo.py`): the synthetic dataset with
its part maps, a small model, SemMAE's adaptive masking, a few minutes on a laptop CPU,
ending with a checkpoint, a TensorBoard log and a picture in `./output_demo`. With
`--data_path` (or `--dataset tfds:NAME`) it is the original's `main_pretrain.py`: its
flags keep their names and meanings, so the original command line works as written.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from semmae_jax import config as config_lib
from semmae_jax import data, flops, masking, sharding
from semmae_jax.checkpoint import WeightsReader
from semmae_jax.config import field
from semmae_jax.image_size import size_text
from semmae_jax.inference import visualize
from semmae_jax.models import create_model, frozen_param_names
from semmae_jax.train import optim
from semmae_jax.train.flags import ComputeFlags, DataFlags, ModelFlags, RematFlags, ScheduleFlags, TrainFlags
from semmae_jax.train.skeleton import Job, Recipe, train
from semmae_jax.train.state import TrainState
from semmae_jax.train.steps import Step, make_pretrain_step


@dataclasses.dataclass(frozen=True)
class PretrainConfig(TrainFlags, DataFlags, ScheduleFlags, ComputeFlags, RematFlags, ModelFlags):
    """Defaults are the original `main_pretrain.py`'s; `configs/*.py` presets change them."""

    # Model.
    model: str = field("mae_vit_large_patch16")
    mask_ratio: float = field(0.75, "fraction of patches removed")
    norm_pix_loss: bool = field(False, "per-patch normalised pixels as the target")
    decay_tokens: bool = field(False, "weight decay on cls_token and mask_token too, as the original's pretraining "
                                      "(default: exempt, as its fine-tuning)")
    # SemMAE masking.
    setting: int = field(0, "masking: 0 random (MAE), 1 intra-part, 2 inter-part, 3 adaptive", choices=(0, 1, 2, 3))
    gamma: float = field(2.0, "adaptive masking: alpha = (epoch / epochs) ** gamma")
    num_parts: int = field(8, "static bound on the part ids in the part maps")
    part_path: str | None = field(None, "part-map tree mirroring --data_path (default with the demo: its parts)")
    missing_part_map: str = field("error", "an image without a part map: 'error' or 'unlabelled'",
                                  choices=("error", "unlabelled"))
    labelled_tokens: int = field(0, "K > 0: the model sees K patches of each image, the first K (grid order) that "
                                    "its part map labels, on the whole image (flip only), as the original's ViT-B/8 "
                                    "on its records (196 of 784); 0: every patch, crops")
    # Run (the original saved every 20 epochs).
    save_every: int = field(20)
    keep_checkpoints: int = field(3)
    vis_every: int = field(10, "picture of reconstructions every N epochs (and at the end)")

    def check(self) -> None:
        if self.labelled_tokens < 0:
            raise ValueError(f"--labelled_tokens must be 0 (every patch) or a count, got {self.labelled_tokens}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"--mask_ratio must be in [0, 1) (some patches must stay visible), got {self.mask_ratio}")
        if self.gamma <= 0 or self.num_parts < 1 or self.vis_every < 1:
            raise ValueError("--gamma must be positive, --num_parts and --vis_every at least 1")


def parse(argv: Sequence[str]) -> PretrainConfig:
    """Flags over a preset; without a dataset the `demo` preset is the default."""

    def default_preset(args: argparse.Namespace) -> str | None:
        uses_data = getattr(args, "data_path", None) or getattr(args, "dataset", "folder") != "folder"
        return None if uses_data else "demo"

    return config_lib.parse_job_config(argv, PretrainConfig, "main.py pretrain", __doc__, default_preset)


def main(argv: Sequence[str], reader: WeightsReader | None = None) -> None:
    """`python main.py pretrain ...`; `reader` reads `--resume` files that are not run directories."""
    config_lib.one_line_errors("main.py pretrain", lambda c: train(PretrainJob(c, reader)), parse(argv))


class PretrainJob(Job):
    """MAE / SemMAE pretraining: the model, semantic masking inside the step, reconstruction pictures."""

    name = "pretrain"
    betas = (0.9, 0.95)  # AdamW's, as the original's pretraining
    defining = Job.defining | {"mask_ratio", "setting", "gamma", "num_parts", "part_path", "norm_pix_loss",
                               "labelled_tokens"}

    def build_model(self) -> nn.Module:
        c = self.config
        return create_model(c.model, img_size=c.input_size, in_chans=c.in_chans, norm_pix_loss=c.norm_pix_loss, dtype=c.dtype,
                            remat=c.remat, attention=c.attention)

    def train_data(self, model: nn.Module) -> tuple[Any, Any]:
        c = self.config
        data_path, part_path = c.data_paths(c.part_path)
        from semmae_jax.data.packed import PACKED_INDEX  # TensorFlow: the data is read now, not at import

        reads_maps = c.labelled_tokens or masking.MaskingSetting(c.setting) is not masking.MaskingSetting.RANDOM
        if c.labelled_tokens > model.num_patches:
            raise ValueError(f"--labelled_tokens {c.labelled_tokens}: {c.model} at {size_text(model.img_size)} has "
                             f"{model.num_patches} patches")
        if c.labelled_tokens and part_path is None and not (Path(data_path) / PACKED_INDEX).is_file():
            raise ValueError("--labelled_tokens picks the patches a part map labels: give --part_path")
        bands = c.bands(model.in_chans)
        source = data.open_source(data_path, "train", dataset=c.dataset, tfds_data_dir=c.tfds_data_dir,
                                  part_path=part_path if reads_maps else None,  # setting 0 alone reads no maps
                                  missing_parts=c.missing_part_map, bands=bands)
        if c.labelled_tokens:  # the maps' positions are the whole image's: no crop, as the original's records
            return source, data.WholeImageTransform(model.img_size, model.patch_size, hflip=0.5, bands=bands)
        return source, data.TrainTransform(img_size=model.img_size, patch_size=model.patch_size,
                                           num_parts=c.num_parts, bands=bands)

    def _no_decay(self) -> tuple[str, ...]:
        return optim.ORIGINAL_PRETRAIN_NO_WEIGHT_DECAY if self.config.decay_tokens else optim.NO_WEIGHT_DECAY

    def optimizer(self, params: Any, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
        return optim.adamw(params, lr_schedule, weight_decay=self.config.weight_decay, betas=self.betas,
                           frozen=frozen_param_names(self.build_model()), no_decay=self._no_decay())

    def param_groups(self, params: Any) -> list[str]:
        return optim.describe_param_groups(params, frozen=frozen_param_names(self.build_model()),
                                           no_decay=self._no_decay())

    def describe(self, recipe: Recipe) -> str:
        c = self.config
        tokens = (f"; {c.labelled_tokens} labelled tokens of {recipe.model.num_patches} per image, whole images"
                  if c.labelled_tokens else "")
        return f"masking setting {c.setting} ({masking.MaskingSetting(c.setting).name}), gamma {c.gamma}{tokens}"

    def flops_per_image(self, recipe: Recipe) -> float:
        return flops.train_flops(recipe.model, self.config.mask_ratio, self.config.labelled_tokens or None)

    def step(self, recipe: Recipe, tx: optax.GradientTransformation) -> Step:
        c = self.config
        return make_pretrain_step(recipe.model, tx, mask_ratio=c.mask_ratio, setting=c.setting, num_parts=c.num_parts,
                                  total_steps=recipe.length.total_steps, gamma=c.gamma,
                                  labelled_tokens=c.labelled_tokens)

    def epoch_end_hook(self, recipe: Recipe) -> Callable:
        return _picture_hook(recipe, self.config)


def _picture_hook(recipe: Recipe, config: PretrainConfig) -> Callable:
    """Every `vis_every` epochs and at the end: input | parts | mask | reconstruction."""
    rows, model = 4, recipe.model

    @functools.partial(jax.jit, out_shardings=sharding.replicated(recipe.mesh))
    @sharding.with_logical_rules
    def reconstruct(params: Any, batch: dict[str, jax.Array], key: jax.Array, alpha: jax.Array) -> tuple:
        noise, positions = masking.tokens_and_noise(
            key, batch["part_labels"], labelled_tokens=config.labelled_tokens, setting=config.setting,
            mask_ratio=config.mask_ratio, alpha=alpha, num_parts=config.num_parts)
        _, pred, mask = model.apply({"params": params}, batch["image"], config.mask_ratio, noise, positions)
        if positions is not None:  # on the whole grid: the patches the model did not see count as removed
            rows_of = jnp.arange(len(positions))[:, None]
            mask = jnp.ones(batch["part_labels"].shape, mask.dtype).at[rows_of, positions].set(mask)
            pred = jnp.zeros((*mask.shape, pred.shape[-1]), pred.dtype).at[rows_of, positions].set(pred)
        return batch["image"][:rows], batch["part_labels"][:rows], mask[:rows], pred[:rows]

    def hook(epoch: int, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, float]:
        if not (epoch + 1 == config.epochs or (epoch + 1) % config.vis_every == 0):
            return {}
        progress = recipe.length.progress((epoch + 1) * recipe.length.steps_per_epoch)
        alpha = jnp.asarray(masking.masking_alpha(config.setting, progress, config.gamma), jnp.float32)
        outputs = [np.asarray(jax.device_get(x))  # replicated: every process holds them
                   for x in reconstruct(state.params, batch, jax.random.key(config.seed), alpha)]
        if recipe.log.enabled:
            panel = visualize.pretrain_panel(*outputs, patch_size=model.patch_size, norm_pix_loss=config.norm_pix_loss)
            recipe.log.picture(int(state.step), epoch, "reconstruction", panel)
        return {}

    return hook
