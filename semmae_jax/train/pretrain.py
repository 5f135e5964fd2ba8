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
from semmae_jax import distributed, masking, sharding, visualize
from semmae_jax.checkpoint import RunCheckpoints, abstract_like
from semmae_jax.config import field
from semmae_jax.metrics_log import RunLog
from semmae_jax.models import create_model, frozen_param_names
from semmae_jax.train import optim
from semmae_jax.train.loop import Schedule, Trainer, resume
from semmae_jax.train.state import TrainState, create_state
from semmae_jax.train.steps import jit_step, make_pretrain_step

ParamsLoader = Callable[[str, str, int], Any]  # (path, model name, img_size) -> params


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
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
    # Optimisation.
    batch_size: int = field(64, "batch size per device (global = batch_size x devices)")
    accum_iter: int = field(1, "gradient accumulation: micro-batches per optimizer update")
    epochs: int = field(400, "training epochs")
    warmup_epochs: int = field(40, "linear warm-up epochs")
    lr: float | None = field(None, "absolute learning rate (default: blr x effective batch / 256)")
    blr: float = field(1e-3, "base learning rate: lr = blr x effective batch / 256")
    min_lr: float = field(0.0, "learning rate at the end of the cosine")
    weight_decay: float = field(0.05, "AdamW weight decay")
    # Data.
    data_path: str | None = field(None, "image folder root with train/ (default: the demo data)")
    part_path: str | None = field(None, "part-map tree mirroring --data_path (default with the demo: its parts)")
    dataset: str = field("folder", "'folder' (--data_path) or 'tfds:NAME'")
    tfds_data_dir: str | None = field(None, "TFDS data dir (ImageNet archives in its downloads/manual/)")
    missing_part_map: str = field("error", "an image without a part map: 'error' or 'unlabelled'",
                                  choices=("error", "unlabelled"))
    num_workers: int = field(10, "parallel decoding calls (tf.data)")
    steps_per_epoch: int | None = field(None, "cap on the steps of an epoch (quick runs)")
    # Run.
    output_dir: str = field("./output_dir", "checkpoints, log.txt and pictures")
    log_dir: str | None = field(None, "TensorBoard directory (default: --output_dir)")
    resume: str = field("auto", "'auto' (this run's latest checkpoint), a run directory, an orbax checkpoint or a .pth")
    seed: int = field(0, "seed of the data order, augmentation, init and masking")
    mesh: str = field(sharding.DEFAULT_MESH, "device mesh, e.g. data:-1,fsdp:2,tensor:1")
    save_every: int = field(20, "checkpoint every N epochs (and at the end)")
    save_every_steps: int = field(0, "also checkpoint every N steps (0: off)")
    keep_checkpoints: int = field(3, "checkpoints kept")
    log_every: int = field(20, "fetch and log metrics every N steps")
    vis_every: int = field(10, "picture of reconstructions every N epochs (and at the end)")
    # Multi-process (jax.distributed's own names; or detected from SLURM / MPI / TPU).
    coordinator_address: str | None = field(None, "HOST:PORT of process 0")
    num_processes: int | None = field(None, "number of processes")
    process_id: int | None = field(None, "this process's index")


def parse(argv: Sequence[str]) -> PretrainConfig:
    parser = argparse.ArgumentParser(prog="main.py pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="preset in configs/ (name or path); default: demo without --data_path")
    config_lib.add_config_flags(parser, PretrainConfig)
    args = parser.parse_args(argv)
    uses_data = getattr(args, "data_path", None) or getattr(args, "dataset", "folder") != "folder"
    preset = args.config or (None if uses_data else "demo")
    base = config_lib.load_preset(preset, PretrainConfig) if preset else PretrainConfig()
    return config_lib.apply_flags(base, args)


def main(argv: Sequence[str], load_params: ParamsLoader | None = None) -> None:
    """`python main.py pretrain ...`; `load_params` reads `--resume` files that are not run directories."""
    config = parse(argv)
    try:
        run(config, load_params)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"main.py pretrain: error: {error}") from error


def data_paths(config: PretrainConfig) -> tuple[str | None, str | None]:
    """(data_path, part_path), the demo data's when no dataset is named."""
    if config.data_path or config.dataset != "folder":
        return config.data_path, config.part_path
    from semmae_jax.data import demo_data

    root = demo_data()
    return str(root), config.part_path or str(root / "parts")


def run(config: PretrainConfig, load_params: ParamsLoader | None = None) -> TrainState:
    """The pretraining job, phase by phase; returns the final state."""
    # Runtime: processes, mesh, logs.
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
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
    eff_batch = global_batch * config.accum_iter
    lr = config.lr if config.lr is not None else config.blr * eff_batch / 256
    updates = schedule.total_steps // config.accum_iter
    warmup = config.warmup_epochs * schedule.steps_per_epoch // config.accum_iter
    lr_schedule = optim.warmup_cosine(lr, config.min_lr, warmup, updates)
    log.print(f"{config.model}: global batch {global_batch} over {jax.device_count()} devices x accum_iter "
              f"{config.accum_iter} = effective batch {eff_batch}; lr {lr:.3e} (blr {config.blr:.3e} x {eff_batch} / 256)")
    log.print(f"mesh {dict(mesh.shape)}; {schedule.steps_per_epoch} steps per epoch, {config.epochs} epochs; "
              f"masking setting {config.setting} ({masking.MaskingSetting(config.setting).name})")

    def make_tx(params: Any):
        return optim.adamw(params, lr_schedule, weight_decay=config.weight_decay, betas=(0.9, 0.95),
                           frozen=frozen_param_names(model), accum_iter=config.accum_iter)

    example = (jax.ShapeDtypeStruct((global_batch, model.img_size, model.img_size, 3), jnp.float32),)
    with jax.set_mesh(mesh):
        state, shardings, tx = create_state(model, make_tx, example, mesh, config.seed)
        _log_placement(log, state, shardings)
        # Restore: this run's checkpoint > --resume > scratch.
        checkpoints = RunCheckpoints(Path(config.output_dir) / "checkpoints", max_to_keep=config.keep_checkpoints)
        params_loader = None if load_params is None else lambda path: load_params(path, config.model, model.img_size)
        state = resume(state, abstract_like(state), checkpoints, config.resume, params_loader, log)
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
        panel = visualize.pretrain_panel(*outputs, patch_size=model.patch_size, norm_pix_loss=config.norm_pix_loss)
        if log.enabled:
            visualize.save_png(log.output_dir / f"reconstruction_epoch{epoch:04d}.png", panel)
            log.image(int(state.step), "reconstruction", panel)
        return {}

    return hook
