"""Stage 1 of SemMAE, training: learn semantic parts on a frozen ViT (`main.py parts train`).

    python main.py parts train --backbone CKPT [--data_path DIR] [--num_parts N] --output_dir OUT

Sharded like pretraining (the same mesh flags, orbax checkpoints with resume, TensorBoard,
progress). The backbone (any checkpoint the converter reads: this project's MAE, MAE /
DINO / iBOT releases and training files) is frozen and saved with the learner, so a run's
checkpoint is all that `parts export / show / eval` (`parts_tools.py`) need. Without
`--data_path` the demo data is used.

Geometry: every stage-1 command feeds the backbone the *whole* image resized to its input
size (no crop), so a part map covers its image exactly; `export` writes it at the patch
grid (or finer), and the pretraining pipeline warps it with the image.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from semmae_jax import config as config_lib
from semmae_jax import data, sharding
from semmae_jax.checkpoint import ResumeTarget, WeightsReader
from semmae_jax.config import field
from semmae_jax.image_size import image_size, size_text
from semmae_jax.inference import visualize
from semmae_jax.parts import (
    LossWeights,
    PartModel,
    assign_parts,
    build_part_model,
    frozen_backbone,
    part_losses,
)
from semmae_jax.train import optim
from semmae_jax.train.flags import ComputeFlags, DataFlags, ScheduleFlags, TrainFlags
from semmae_jax.train.skeleton import Job, Recipe, train
from semmae_jax.train.state import TrainState
from semmae_jax.train.steps import Step, apply_gradients


@dataclasses.dataclass(frozen=True)
class PartsConfig(TrainFlags, DataFlags, ScheduleFlags, ComputeFlags):
    """`parts train` flags (with the shared run, data and schedule flags); `configs/parts_*.py` presets."""

    # Backbone and learner.
    backbone: str | None = field(None, "frozen ViT: a .pth (MAE, DINO, iBOT) or an orbax checkpoint / run directory")
    input_size: int | tuple[int, int] | None = field(None, "backbone input size: one side or HEIGHT WIDTH (default: the "
                                                           "checkpoint's; else the position table is resampled)",
                                                     join=image_size)
    num_parts: int = field(6, "N, the number of parts (ids 0..N-1)")
    background: bool = field(False, "add a background part (exported as 'no part', 255)")
    blur_sigma: float = field(0.5, "Gaussian blur of the part maps, in patches (0: none)")
    decoder_width: int = field(64, "channels of the decoder's first block (halved at each upsampling)")
    decoder_upsamples: int = field(2, "x2 upsamplings of the decoder: it reconstructs at grid * 2**this")
    # Loss weights (0 turns a term off).
    pixel_weight: float = field(0.05, "image reconstruction (MSE) from the part maps")
    feature_weight: float = field(0.0, "frozen-backbone tokens of the reconstruction vs the image's")
    token_weight: float = field(1.0, "backbone patch tokens rebuilt from the part maps")
    diversity_weight: float = field(0.05, "diversity: overlap between the maps")
    foreground_weight: float = field(0.07, "with --background: cost of the part maps' area")
    hflip: float = field(0.5, "probability of a horizontal flip")
    vis_every: int = field(10, "picture of the parts every N epochs (and at the end)")
    # Shared flags with other defaults (AdamW, lr = blr x batch / 256: 1e-3 at batch 64).
    epochs: int = field(100)
    warmup_epochs: int = field(5)
    blr: float = field(4e-3)
    num_workers: int = field(8)
    output_dir: str = field("./output_parts")
    resume: str = field("auto", "'auto' (this run's latest checkpoint) or another parts run directory")
    save_every: int = field(10)

    def loss_weights(self) -> LossWeights:
        return LossWeights(pixels=self.pixel_weight, features=self.feature_weight, tokens=self.token_weight,
                           diversity=self.diversity_weight,
                           foreground=self.foreground_weight if self.background else 0.0)


# ------------------------------------------------------------------------------ model


def make_parts_step(model: PartModel, tx: optax.GradientTransformation, weights: LossWeights, background: bool) -> Step:
    """`step(state, batch) -> (state, metrics)`: the losses, their gradient (backbone frozen), AdamW."""

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            outputs = model.apply({"params": frozen_backbone(params)}, batch["image"])
            return part_losses(outputs, batch["image"], weights, background)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state, refused = apply_gradients(state, tx, grads, loss)
        return state, {**metrics, "grad_norm": optax.tree.norm(grads), **refused}

    return step


# ------------------------------------------------------------------------------ train


def parse_train(argv: Sequence[str]) -> PartsConfig:
    config = config_lib.parse_job_config(argv, PartsConfig, "main.py parts train", __doc__)
    if not config.backbone:
        raise SystemExit("main.py parts train: error: --backbone is required (a .pth or an orbax checkpoint of a ViT / MAE)")
    return config


class PartsJob(Job):
    """Stage 1: a part learner on a frozen backbone, which is saved with it."""

    name = "parts"
    defining = Job.defining | {"backbone", "num_parts", "background"}

    def __init__(self, config: PartsConfig, reader: WeightsReader) -> None:
        super().__init__(config, reader)
        # torch reads the backbone before TensorFlow starts
        self.backbone_params, self.backbone_name, self.backbone_overrides = reader.encoder(config.backbone,
                                                                                            config.input_size)

    def build_model(self) -> nn.Module:
        overrides = {**self.backbone_overrides, "attention": self.config.attention}  # the run's, not saved with it
        return build_part_model(dataclasses.asdict(self.config), self.backbone_name, overrides)

    def train_data(self, model: nn.Module) -> tuple[Any, Any]:
        c = self.config
        bands = c.bands(model.in_chans)
        source = data.open_source(c.data_paths()[0], "train", dataset=c.dataset, tfds_data_dir=c.tfds_data_dir,
                                  bands=bands)
        return source, data.WholeImageTransform(model.img_size, model.patch_size, c.hflip, bands=bands)

    def optimizer(self, params: Any, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
        return optim.adamw(params, lr_schedule, weight_decay=self.config.weight_decay, betas=(0.9, 0.999),
                           frozen=("backbone",))

    def param_groups(self, params: Any) -> list[str]:
        return optim.describe_param_groups(params, frozen=("backbone",))

    def describe(self, recipe: Recipe) -> str:
        c, backbone = self.config, recipe.model.backbone
        rows, columns = backbone.grid_hw
        return (f"backbone {c.backbone}: {self.backbone_name} {self.backbone_overrides} at "
                f"{size_text(backbone.img_size)} ({rows}x{columns} patches), frozen; {c.num_parts} parts"
                f"{' + background' if c.background else ''}")

    def resume_target(self, recipe: Recipe) -> ResumeTarget | None:
        return None  # --resume takes another parts run directory

    def start(self, state: TrainState, recipe: Recipe) -> TrainState:
        return state.replace(params={**state.params, "backbone": _place(self.backbone_params,
                                                                         state.params["backbone"])})

    def step(self, recipe: Recipe, tx: optax.GradientTransformation) -> Step:
        return make_parts_step(recipe.model, tx, self.config.loss_weights(), self.config.background)

    def epoch_end_hook(self, recipe: Recipe) -> Callable:
        return _picture_hook(recipe, self.config)

    def saved_config(self) -> dict[str, Any]:
        return {**super().saved_config(), "backbone_model": self.backbone_name,
                "backbone_overrides": self.backbone_overrides}


def _place(params: Any, like: Any) -> Any:
    """The loaded backbone params where (and as) the initialised ones are; a clear error if they do not fit."""
    shapes = jax.tree.map(np.shape, params)
    if shapes != jax.tree.map(np.shape, like):
        raise ValueError(f"the backbone's params do not fit its model: {shapes} vs {jax.tree.map(np.shape, like)}")
    return jax.device_put(params, jax.tree.map(lambda x: x.sharding, like))


def _picture_hook(recipe: Recipe, config: PartsConfig) -> Callable:
    """Every `vis_every` epochs and at the end: images with their parts overlaid."""
    model = recipe.model

    @functools.partial(jax.jit, out_shardings=sharding.replicated(recipe.mesh))
    @sharding.with_logical_rules
    def parts_of(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return images[:8], assign_parts(model.apply({"params": params}, images[:8]).maps, config.background)

    def hook(epoch: int, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, float]:
        if (epoch + 1) % config.vis_every and epoch + 1 != config.epochs:
            return {}
        images, labels = (np.asarray(jax.device_get(x)) for x in parts_of(state.params, batch["image"]))
        if recipe.log.enabled:
            recipe.log.picture(int(state.step), epoch, "parts", visualize.parts_panel(images, [labels.reshape(len(labels), -1)]))
        return {}

    return hook


# ------------------------------------------------------------------------------ entry


def train_main(argv: Sequence[str], reader: WeightsReader) -> None:
    """`python main.py parts train ...`; `reader` reads the backbone checkpoint."""
    config_lib.one_line_errors("main.py parts train", lambda c: train(PartsJob(c, reader)), parse_train(argv))
