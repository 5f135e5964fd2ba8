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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semmae_jax import config as config_lib
from semmae_jax import sharding, visualize
from semmae_jax.checkpoint import RunCheckpoints, abstract_like
from semmae_jax.config import field
from semmae_jax.metrics_log import RunLog
from semmae_jax.parts import (
    LossWeights,
    PartLearner,
    PartModel,
    assign_parts,
    backbone_model,
    frozen_backbone,
    part_losses,
)
from semmae_jax.train import optim
from semmae_jax.train.flags import DataFlags, RunFlags, ScheduleFlags
from semmae_jax.train.loop import Schedule, Trainer, resume
from semmae_jax.train.state import TrainState, create_state
from semmae_jax.train.steps import jit_step

# (path, input size or None for the checkpoint's own) -> (encoder params, model name, overrides)
BackboneLoader = Callable[[str, int | None], tuple[Any, str, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class PartsConfig(RunFlags, DataFlags, ScheduleFlags):
    """`parts train` flags (with the shared run, data and schedule flags); `configs/parts_*.py` presets."""

    # Backbone and learner.
    backbone: str | None = field(None, "frozen ViT: a .pth (MAE, DINO, iBOT) or an orbax checkpoint / run directory")
    input_size: int | None = field(None, "backbone input size (default: the checkpoint's; else the position table is resampled)")
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


def part_model(config: PartsConfig, backbone_name: str, backbone_overrides: dict[str, Any]) -> PartModel:
    """The frozen backbone + learner that `config` describes."""
    learner = PartLearner(num_parts=config.num_parts, background=config.background, blur_sigma=config.blur_sigma,
                          decoder_width=config.decoder_width, decoder_upsamples=config.decoder_upsamples)
    return PartModel(backbone_model(backbone_name, backbone_overrides), learner, feature_loss=config.feature_weight > 0)


def make_parts_step(model: PartModel, tx: optax.GradientTransformation, weights: LossWeights, background: bool) -> Callable:
    """`step(state, batch, unused) -> (state, metrics)`: the losses, their gradient (backbone frozen), AdamW."""

    def step(state: TrainState, batch: dict[str, jax.Array], _: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            outputs = model.apply({"params": frozen_backbone(params)}, batch["image"])
            return part_losses(outputs, batch["image"], weights, background)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        return new_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    return step


# ------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class WholeImageTransform:
    """The whole image resized to the backbone's input (no crop), optional flip.

    Returns {'image': uint8 [S, S, 3] (the pipeline normalises batches), 'part_labels':
    int32 [L]} (all -1 without a part map), the map warped with the image, so a part
    map's pixels stay on their image's.
    """

    img_size: int
    patch_size: int
    hflip: float = 0.0

    def __call__(self, raw: dict[str, Any], seed: Any) -> dict[str, Any]:
        import tensorflow as tf

        from semmae_jax.data import transforms as T

        image = T.decode_full(raw)
        size = tf.shape(image)[:2]
        flip = tf.random.stateless_uniform([], seed) < self.hflip
        image = T.resize(image, (self.img_size, self.img_size), "bicubic")
        image = tf.gather(image, T.flip_columns(self.img_size, flip), axis=1)
        window = tf.concat([[0, 0], size], axis=0)
        labels = T.warped_part_labels(raw["part"], window, size, self.img_size, self.patch_size, flip)
        return {"image": image, "part_labels": labels}


def default_data(data_path: str | None, part_path: str | None = None) -> tuple[str, str | None]:
    """(data_path, part_path): the demo's, with its true part maps, when no data is named."""
    if data_path:
        return data_path, part_path
    from semmae_jax.data import demo_data

    root = demo_data()
    return str(root), part_path or str(root / "parts")


# ------------------------------------------------------------------------------ train


def parse_train(argv: Sequence[str]) -> PartsConfig:
    config = config_lib.parse_job_config(argv, PartsConfig, "main.py parts train", __doc__)
    if not config.backbone:
        raise SystemExit("main.py parts train: error: --backbone is required (a .pth or an orbax checkpoint of a ViT / MAE)")
    return config


def train(config: PartsConfig, load_backbone: BackboneLoader) -> TrainState:
    """The part-learning job, phase by phase (as `pretrain.run`); returns the final state."""
    config.start_runtime()
    backbone_params, name, overrides = load_backbone(config.backbone, config.input_size)  # torch before TensorFlow
    from semmae_jax import data  # TensorFlow starts here, after jax.distributed

    mesh = sharding.make_mesh(config.mesh)
    log = RunLog(config.output_dir, config.log_dir)
    model = part_model(config, name, overrides)
    size, patch = model.backbone.img_size, model.backbone.patch_size
    global_batch = config.batch_size * jax.device_count()
    sharding.check_global_batch(global_batch, mesh)
    source = data.open_source(config.resolved_data_path(), "train", dataset=config.dataset,
                              tfds_data_dir=config.tfds_data_dir)
    loader = data.TrainLoader(source, batch_size=global_batch // jax.process_count(), seed=config.seed,
                              transform=WholeImageTransform(size, patch, config.hflip), num_workers=config.num_workers)
    schedule = Schedule(epochs=config.epochs, steps_per_epoch=min(loader.steps_per_epoch, config.steps_per_epoch or 10**12),
                        save_every=config.save_every, save_every_steps=config.save_every_steps,
                        log_every=config.log_every)
    lr, eff_batch = config.learning_rate(global_batch)
    lr_schedule = optim.warmup_cosine(lr, config.min_lr, config.warmup_epochs * schedule.steps_per_epoch // config.accum_iter,
                                      schedule.total_steps // config.accum_iter)
    log.print(f"backbone {config.backbone}: {name} {overrides} at {size}x{size} ({size // patch}x{size // patch} "
              f"patches), frozen; {config.num_parts} parts{' + background' if config.background else ''}; "
              f"effective batch {eff_batch}, lr {lr:.2e}, {schedule.steps_per_epoch} steps per epoch, {config.epochs} epochs")

    def make_tx(params: Any) -> optax.GradientTransformation:
        return optim.adamw(params, lr_schedule, weight_decay=config.weight_decay, betas=(0.9, 0.999),
                           frozen=("backbone",), accum_iter=config.accum_iter)

    example = (jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32),)
    with jax.set_mesh(mesh):
        state, shardings, tx = create_state(model, make_tx, example, mesh, config.seed)
        state = state.replace(params={**state.params, "backbone": _place(backbone_params, state.params["backbone"])})
        checkpoints = RunCheckpoints(config.checkpoint_dir, max_to_keep=config.keep_checkpoints)
        state = resume(state, abstract_like(state), checkpoints, config.resume, None, log)
        step = jit_step(make_parts_step(model, tx, config.loss_weights(), config.background), shardings,
                        sharding.batch_sharding(mesh), mesh)
        run_config = {"job": "parts", **dataclasses.asdict(config), "backbone_model": name,
                      "backbone_overrides": overrides}
        trainer = Trainer(step_fn=step, epoch_batches=loader.epoch_batches, mesh=mesh, schedule=schedule,
                          lr_at=lambda s: float(lr_schedule(s // config.accum_iter)), checkpoints=checkpoints, config=run_config, log=log,
                          images_per_step=global_batch, on_epoch_end=_picture_hook(model, config, log, mesh))
        state = trainer.run(state)
    checkpoints.close()
    log.close()
    return state


def _place(params: Any, like: Any) -> Any:
    """The loaded backbone params where (and as) the initialised ones are; a clear error if they do not fit."""
    shapes = jax.tree.map(np.shape, params)
    if shapes != jax.tree.map(np.shape, like):
        raise ValueError(f"the backbone's params do not fit its model: {shapes} vs {jax.tree.map(np.shape, like)}")
    return jax.device_put(params, jax.tree.map(lambda x: x.sharding, like))


def _picture_hook(model: PartModel, config: PartsConfig, log: RunLog, mesh: jax.sharding.Mesh) -> Callable:
    """Every `vis_every` epochs and at the end: images with their parts overlaid."""

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    @sharding.with_logical_rules
    def parts_of(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return images[:8], assign_parts(model.apply({"params": params}, images[:8]).maps, config.background)

    def hook(epoch: int, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, float]:
        if (epoch + 1) % config.vis_every and epoch + 1 != config.epochs:
            return {}
        images, labels = (np.asarray(jax.device_get(x)) for x in parts_of(state.params, batch["image"]))
        if log.enabled:
            log.picture(int(state.step), epoch, "parts", visualize.parts_panel(images, [labels.reshape(len(labels), -1)]))
        return {}

    return hook


# ------------------------------------------------------------------------------ entry


def train_main(argv: Sequence[str], load_params: BackboneLoader) -> None:
    """`python main.py parts train ...`; `load_params` reads the backbone checkpoint."""
    config_lib.run_job("main.py parts train", train, parse_train(argv), load_params)
