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

import jax
import jax.numpy as jnp
import numpy as np

from semmae_jax import config as config_lib
from semmae_jax import masking, sharding, visualize
from semmae_jax.checkpoint import RunCheckpoints, abstract_like
from semmae_jax.config import field
from semmae_jax.metrics_log import RunLog
from semmae_jax.models import create_model, frozen_param_names
from semmae_jax.train import optim
from semmae_jax.train.flags import DataFlags, RunFlags, ScheduleFlags
from semmae_jax.train.loop import OptimizerLoader, Schedule, Trainer, continue_torch_run, resume
from semmae_jax.train.state import TrainState, create_state
from semmae_jax.train.steps import jit_step, make_pretrain_step

ParamsLoader = Callable[[str, str, int], Any]  # (path, model name, img_size) -> params
BETAS = (0.9, 0.95)  # AdamW's, as the original's pretraining


@dataclasses.dataclass(frozen=True)
class PretrainConfig(RunFlags, DataFlags, ScheduleFlags):
    """Defaults are the original `main_pretrain.py`'s; `configs/*.py` presets change them."""

    # Model.
    model: str = field("mae_vit_large_patch16", "registered model name (see README, Models)")
    input_size: int = field(224, "image size")
    mask_ratio: float = field(0.75, "fraction of patches removed")
    norm_pix_loss: bool = field(False, "per-patch normalised pixels as the target")
    dtype: str = field("float32", "compute dtype (params stay float32)", choices=("float32", "bfloat16"))
    remat: bool = field(False, "recompute each block's activations in the backward pass")
    # SemMAE masking.
    setting: int = field(0, "masking: 0 random (MAE), 1 intra-part, 2 inter-part, 3 adaptive", choices=(0, 1, 2, 3))
    gamma: float = field(2.0, "adaptive masking: alpha = (epoch / epochs) ** gamma")
    num_parts: int = field(8, "static bound on the part ids in the part maps")
    part_path: str | None = field(None, "part-map tree mirroring --data_path (default with the demo: its parts)")
    missing_part_map: str = field("error", "an image without a part map: 'error' or 'unlabelled'",
                                  choices=("error", "unlabelled"))
    # Run (the original saved every 20 epochs).
    save_every: int = field(20)
    keep_checkpoints: int = field(3)
    vis_every: int = field(10, "picture of reconstructions every N epochs (and at the end)")


def parse(argv: Sequence[str]) -> PretrainConfig:
    """Flags over a preset; without a dataset the `demo` preset is the default."""

    def default_preset(args: argparse.Namespace) -> str | None:
        uses_data = getattr(args, "data_path", None) or getattr(args, "dataset", "folder") != "folder"
        return None if uses_data else "demo"

    return config_lib.parse_job_config(argv, PretrainConfig, "main.py pretrain", __doc__, default_preset)


def main(
    argv: Sequence[str], load_params: ParamsLoader | None = None, load_optimizer: OptimizerLoader | None = None
) -> None:
    """`python main.py pretrain ...`; `load_params` reads `--resume` files that are not run directories,
    `load_optimizer` the optimizer state of the original's training checkpoints among them."""
    config_lib.run_job("main.py pretrain", run, parse(argv), load_params, load_optimizer)


def data_paths(config: PretrainConfig) -> tuple[str | None, str | None]:
    """(data_path, part_path), the demo data's (with its part maps) when no dataset is named."""
    data_path = config.resolved_data_path()
    if config.data_path or config.dataset != "folder":
        return data_path, config.part_path
    return data_path, config.part_path or str(Path(data_path) / "parts")


def run(
    config: PretrainConfig, load_params: ParamsLoader | None = None, load_optimizer: OptimizerLoader | None = None
) -> TrainState:
    """The pretraining job, phase by phase; returns the final state."""
    # Runtime: processes, mesh, logs.
    config.start_runtime()
    from semmae_jax import data  # TensorFlow starts here, after jax.distributed

    mesh = sharding.make_mesh(config.mesh)
    log = RunLog(config.output_dir, config.log_dir)
    # Data.
    global_batch = config.batch_size * jax.device_count()
    sharding.check_global_batch(global_batch, mesh)
    data_path, part_path = data_paths(config)
    source = data.open_source(data_path, "train", dataset=config.dataset, tfds_data_dir=config.tfds_data_dir,
                              part_path=part_path, missing_parts=config.missing_part_map)
    model = create_model(config.model, img_size=config.input_size, norm_pix_loss=config.norm_pix_loss,
                         dtype=config.dtype, remat=config.remat)
    loader = data.TrainLoader(source, batch_size=global_batch // jax.process_count(), seed=config.seed,
                              transform=data.TrainTransform(img_size=model.img_size, patch_size=model.patch_size),
                              num_workers=config.num_workers)
    schedule = Schedule(epochs=config.epochs, steps_per_epoch=min(loader.steps_per_epoch, config.steps_per_epoch or 10**12),
                        save_every=config.save_every, save_every_steps=config.save_every_steps,
                        log_every=config.log_every)
    # Optimizer and sharded state.
    lr, eff_batch = config.learning_rate(global_batch)
    updates = schedule.total_steps // config.accum_iter
    warmup = config.warmup_epochs * schedule.steps_per_epoch // config.accum_iter
    lr_schedule = optim.warmup_cosine(lr, config.min_lr, warmup, updates)
    log.print(f"{config.model}: global batch {global_batch} over {jax.device_count()} devices x accum_iter "
              f"{config.accum_iter} = effective batch {eff_batch}; lr {lr:.3e} (blr {config.blr:.3e} x {eff_batch} / 256)")
    log.print(f"mesh {dict(mesh.shape)}; {schedule.steps_per_epoch} steps per epoch, {config.epochs} epochs; "
              f"masking setting {config.setting} ({masking.MaskingSetting(config.setting).name})")

    def make_tx(params: Any):
        return optim.adamw(params, lr_schedule, weight_decay=config.weight_decay, betas=BETAS,
                           frozen=frozen_param_names(model), accum_iter=config.accum_iter)

    example = (jax.ShapeDtypeStruct((global_batch, model.img_size, model.img_size, 3), jnp.float32),)
    with jax.set_mesh(mesh):
        state, shardings, tx = create_state(model, make_tx, example, mesh, config.seed)
        _log_placement(log, state, shardings)
        # Restore: this run's checkpoint > --resume > scratch.
        checkpoints = RunCheckpoints(config.checkpoint_dir, max_to_keep=config.keep_checkpoints)
        params_loader = None if load_params is None else lambda path: load_params(path, config.model, model.img_size)
        continue_optimizer = None if load_optimizer is None else functools.partial(
            continue_torch_run, load_optimizer, config.model, schedule, config.accum_iter, BETAS, log)
        state = resume(state, abstract_like(state), checkpoints, config.resume, params_loader, log, continue_optimizer)
        step = jit_step(make_pretrain_step(model, tx, mask_ratio=config.mask_ratio, setting=config.setting,
                                           num_parts=config.num_parts),
                        shardings, sharding.batch_sharding(mesh), mesh)
        trainer = Trainer(
            step_fn=step,
            epoch_batches=lambda epoch, start: loader.epoch_batches(epoch, start),
            mesh=mesh,
            schedule=schedule,
            lr_at=lambda s: float(lr_schedule(s // config.accum_iter)),
            checkpoints=checkpoints,
            config={"job": "pretrain", **dataclasses.asdict(config)},
            log=log,
            images_per_step=global_batch,
            step_scalar=lambda progress: masking.masking_alpha(config.setting, progress, config.gamma),
            scalar_name="alpha",
            on_epoch_end=_picture_hook(model, config, schedule, log, mesh),
        )
        state = trainer.run(state)
    checkpoints.close()
    log.close()
    return state


def _log_placement(log: RunLog, state: TrainState, shardings: TrainState) -> None:
    """Where each parameter lives and how it is optimised, once, in the output dir."""
    if log.enabled:
        lines = sharding.describe(jax.tree.map(lambda s: s.spec, shardings.params))
        (log.output_dir / "param_placement.txt").write_text("\n".join(lines) + "\n")
        log.print(f"{sum(x.size for x in jax.tree.leaves(state.params)):,} parameters; placement in "
                  f"{log.output_dir / 'param_placement.txt'}")


def _picture_hook(model: Any, config: PretrainConfig, schedule: Schedule, log: RunLog, mesh: jax.sharding.Mesh) -> Callable:
    """Every `vis_every` epochs and at the end: input | parts | mask | reconstruction."""
    rows = 4

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    @sharding.with_logical_rules
    def reconstruct(params: Any, batch: dict[str, jax.Array], key: jax.Array, alpha: jax.Array) -> tuple:
        noise = masking.masking_noise(key, batch["part_labels"], setting=config.setting,
                                      mask_ratio=config.mask_ratio, alpha=alpha, num_parts=config.num_parts)
        _, pred, mask = model.apply({"params": params}, batch["image"], config.mask_ratio, noise)
        return batch["image"][:rows], batch["part_labels"][:rows], mask[:rows], pred[:rows]

    def hook(epoch: int, state: TrainState, batch: dict[str, jax.Array]) -> dict[str, float]:
        last = epoch + 1 == config.epochs
        if not (last or (epoch + 1) % config.vis_every == 0):
            return {}
        alpha = masking.masking_alpha(config.setting, schedule.progress((epoch + 1) * schedule.steps_per_epoch), config.gamma)
        outputs = reconstruct(state.params, batch, jax.random.key(config.seed), jnp.asarray(alpha, jnp.float32))
        outputs = [np.asarray(jax.device_get(x)) for x in outputs]  # replicated: every process holds them
        if log.enabled:
            panel = visualize.pretrain_panel(*outputs, patch_size=model.patch_size, norm_pix_loss=config.norm_pix_loss)
            log.picture(int(state.step), epoch, "reconstruction", panel)
        return {}

    return hook
