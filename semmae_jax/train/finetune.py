"""Fine-tuning and evaluation of ViT classifiers: `python main.py finetune [flags]`.

The original's `main_finetune.py` with its flags: `--finetune PRETRAINED` starts from a
MAE / SemMAE pretraining checkpoint (orbax or `.pth`), `--eval --resume CKPT` only
evaluates, printing `* Acc@1 X Acc@5 Y loss Z` and `Accuracy of the network on the N
test images: X%`. The recipe: layer-wise lr decay, AdamW, warm-up + cosine per step,
drop path, RandAugment and random erasing, mixup / cutmix with label smoothing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semmae_jax import config as config_lib
from semmae_jax import sharding
from semmae_jax.checkpoint import RunCheckpoints, abstract_like
from semmae_jax.config import field
from semmae_jax.metrics_log import RunLog
from semmae_jax.models import create_model
from semmae_jax.paths import flat_by_path, map_with_path, summarize
from semmae_jax.train import erasing, evaluate, mixup, optim
from semmae_jax.train.flags import DataFlags, RunFlags, ScheduleFlags
from semmae_jax.train.loop import OptimizerLoader, Schedule, Trainer, continue_torch_run, resume
from semmae_jax.train.state import TrainState, create_state, plan_state
from semmae_jax.train.steps import jit_step

ParamsLoader = Callable[[str, str | None, int], Any]  # (path, model name or None = as saved, img_size) -> params
MIX_STREAM, DROP_STREAM, ERASE_STREAM = 1, 2, 3
BETAS = (0.9, 0.999)  # AdamW's, as the original's fine-tuning


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(RunFlags, DataFlags, ScheduleFlags):
    """Defaults are the original `main_finetune.py`'s."""

    # Model.
    model: str = field("vit_large_patch16", "registered classifier name")
    input_size: int = field(224, "image size")
    drop_path: float = field(0.1, "stochastic depth rate")
    global_pool: bool = field(True, "mean-pool the patch tokens (--cls_token: use the cls token)")
    nb_classes: int = field(1000, "number of classes")
    dtype: str = field("float32", "compute dtype (params stay float32)", choices=("float32", "bfloat16"))
    remat: bool = field(False, "recompute each block's activations in the backward pass")
    # Optimisation (the shared flags with the fine-tuning defaults).
    epochs: int = field(50)
    warmup_epochs: int = field(5)
    min_lr: float = field(1e-6)
    layer_decay: float = field(0.75, "layer-wise lr decay")
    clip_grad: float | None = field(None, "clip gradients to this global norm")
    # Augmentation.
    aa: str | None = field("rand-m9-mstd0.5-inc1", "RandAugment policy (timm syntax); 'none' for none")
    reprob: float = field(0.25, "random erasing probability")
    remode: str = field("pixel", "random erasing fill", choices=("const", "rand", "pixel"))
    recount: int = field(1, "random erasing boxes per image")
    mixup: float = field(0.0, "mixup alpha (active if > 0)")
    cutmix: float = field(0.0, "cutmix alpha (active if > 0)")
    cutmix_minmax: tuple[float, float] | None = field(None, "cutmix box size range (overrides --cutmix)")
    mixup_prob: float = field(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = field(0.5, "probability of cutmix rather than mixup when both are active")
    mixup_mode: str = field("batch", "per 'batch', 'pair' or 'elem'", choices=("batch", "pair", "elem"))
    smoothing: float = field(0.1, "label smoothing")
    # Checkpoints and evaluation.
    finetune: str | None = field(None, "pretrained checkpoint to start from (orbax dir or .pth)")
    eval: bool = field(False, "evaluate --resume on the validation split and stop")
    dist_eval: bool = field(False, "accepted for the original's command lines: evaluation is always distributed")
    eval_batch_size: int | None = field(None, "evaluation batch per device (default: --batch_size)")

    def mixup_config(self) -> mixup.MixupConfig:
        return mixup.MixupConfig(
            mixup=self.mixup, cutmix=self.cutmix, cutmix_minmax=self.cutmix_minmax, mixup_prob=self.mixup_prob,
            mixup_switch_prob=self.mixup_switch_prob, mixup_mode=self.mixup_mode, smoothing=self.smoothing,
            nb_classes=self.nb_classes,
        )


def parse(argv: Sequence[str]) -> FinetuneConfig:
    return config_lib.parse_job_config(argv, FinetuneConfig, "main.py finetune", __doc__,
                                       aliases={"--cls_token": ("global_pool", False)})


def main(
    argv: Sequence[str], load_params: ParamsLoader | None = None, load_optimizer: OptimizerLoader | None = None
) -> None:
    """`python main.py finetune ...` (and `main.py eval ...`, which adds `--eval`); `load_params` reads
    checkpoints, `load_optimizer` the AdamW state of the original's training checkpoints (`--resume X.pth`)."""
    config_lib.run_job("main.py finetune", run, parse(argv), load_params, load_optimizer)


def eval_main(argv: Sequence[str], load_params: ParamsLoader | None = None) -> None:
    """`python main.py eval ...`: `finetune --eval`."""
    main(["--eval", *argv], load_params)


# ---------------------------------------------------------------- pretrained weights


def merge_pretrained(target: Any, source: Any) -> tuple[Any, list[str], list[str]]:
    """`target` params with every leaf `source` has in the same path and shape, placed as in `target`.

    `target` leaves are arrays or `jax.ShapeDtypeStruct`s with shardings.
    Returns (params, missing: target paths left as initialised, unused: source paths not
    taken) — MAE's `load_state_dict(strict=False)` report. A head of another shape
    (other classes) is dropped, as the original does, and so reported missing.
    """
    src, dst = flat_by_path(source), flat_by_path(target)
    taken = {p for p, x in dst.items() if p in src and tuple(np.shape(src[p])) == tuple(x.shape)}
    params = map_with_path(lambda path, x: _placed(src[path], x) if path in taken else x, target)
    return params, sorted(set(dst) - taken), sorted(set(src) - taken)


def _placed(value: Any, like: jax.Array) -> jax.Array:
    return jax.device_put(np.asarray(value, like.dtype), like.sharding)


# ---------------------------------------------------------------- the step


def make_finetune_step(model: Any, tx: optax.GradientTransformation, config: FinetuneConfig) -> Callable:
    """`step(state, batch, unused) -> (state, metrics)`: erase, mix, forward with drop path, update."""
    mix = config.mixup_config()
    erase = erasing.ErasingConfig(reprob=config.reprob, remode=config.remode, recount=config.recount)

    def step(state: TrainState, batch: dict[str, jax.Array], unused: jax.Array) -> tuple[TrainState, dict]:
        del unused
        images = batch["image"]
        if config.reprob > 0:
            images = erasing.random_erasing(state.step_key(ERASE_STREAM), images, erase)
        images, targets = mixup.mixup(state.step_key(MIX_STREAM), images, batch["label"], mix)

        def loss_fn(params: Any) -> jax.Array:
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": state.step_key(DROP_STREAM)})
            return mixup.soft_target_cross_entropy(logits, targets)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


# ---------------------------------------------------------------- the job


def run(
    config: FinetuneConfig, load_params: ParamsLoader | None = None, load_optimizer: OptimizerLoader | None = None
) -> evaluate.EvalResult | None:
    """Fine-tune (or, with `eval`, only evaluate); returns the last evaluation."""
    config.start_runtime()
    from semmae_jax import data

    mesh = sharding.make_mesh(config.mesh)
    log = RunLog(config.output_dir, config.log_dir)
    model = create_model(config.model, img_size=config.input_size, num_classes=config.nb_classes,
                         global_pool=config.global_pool, drop_path_rate=config.drop_path, dtype=config.dtype,
                         remat=config.remat)
    data_path = config.resolved_data_path()
    val = data.open_source(data_path, "val", dataset=config.dataset, tfds_data_dir=config.tfds_data_dir)
    check_classes(val.num_classes, config.nb_classes)
    eval_global = (config.eval_batch_size or config.batch_size) * jax.device_count()
    sharding.check_global_batch(eval_global, mesh, "evaluation batch")
    val_loader = data.EvalLoader(val, batch_size=eval_global // jax.process_count(),
                                 transform=data.EvalTransform(model.img_size), num_workers=config.num_workers)

    def logits_fn(variables: Any, images: jax.Array) -> jax.Array:
        return model.apply(variables, images, train=False)

    if config.eval:
        return _evaluate_only(config, model, mesh, val_loader, logits_fn, load_params, log)
    return _train(config, model, mesh, data, data_path, val_loader, logits_fn, load_params, load_optimizer, log)


def check_classes(found: int, nb_classes: int) -> None:
    """A dataset with more classes than the head has would train on labels the head cannot output."""
    if found > nb_classes:
        raise ValueError(f"the dataset has {found} classes but --nb_classes is {nb_classes}")


def _evaluate_only(config, model, mesh, val_loader, logits_fn, load_params, log) -> evaluate.EvalResult:
    """`--eval --resume CKPT`: the checkpoint must be exactly this classifier (keys and shapes)."""
    if not config.resume or config.resume == "auto" or load_params is None:
        raise ValueError("--eval needs --resume CHECKPOINT (a .pth, an orbax checkpoint or a run directory)")
    example = (jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32),)
    with jax.set_mesh(mesh):
        plan = plan_state(model, lambda params: optax.identity(), example, mesh, config.seed)
        source = load_params(config.resume, None, model.img_size)
        params, missing, unused = merge_pretrained(plan.abstract.params, source)
        if missing or unused:
            raise ValueError(f"{config.resume} does not fit {config.model} (--nb_classes {config.nb_classes}, "
                             f"global_pool {config.global_pool}): missing {missing}, unexpected {unused}")
        step = evaluate.make_eval_step(logits_fn, config.nb_classes, mesh, {"params": plan.shardings.params})
        result = evaluate.evaluate(step, {"params": params}, val_loader.batches(), val_loader.num_batches,
                                   config.nb_classes, mesh)
    log.print(result.original_lines())
    if log.enabled:
        result.write_per_class(log.output_dir / "per_class_accuracy.json")
    return result


def _optimizer(config: FinetuneConfig, model: Any, steps: Schedule, global_batch: int):
    lr, eff_batch = config.learning_rate(global_batch)
    schedule = optim.warmup_cosine(lr, config.min_lr, config.warmup_epochs * steps.steps_per_epoch // config.accum_iter,
                                   steps.total_steps // config.accum_iter)

    def make_tx(params: Any) -> optax.GradientTransformation:
        scales = optim.layer_decay_scales(params, model.depth, config.layer_decay)
        return optim.adamw(params, schedule, weight_decay=config.weight_decay, betas=BETAS,
                           lr_scales=scales, accum_iter=config.accum_iter, clip_grad=config.clip_grad)

    return lr, eff_batch, schedule, make_tx


def _train(config, model, mesh, data, data_path, val_loader, logits_fn, load_params, load_optimizer,
           log) -> evaluate.EvalResult:
    global_batch = config.batch_size * jax.device_count()
    sharding.check_global_batch(global_batch, mesh)
    train = data.open_source(data_path, "train", dataset=config.dataset, tfds_data_dir=config.tfds_data_dir)
    from semmae_jax.data.augment import finetune_augment

    transform = data.TrainTransform(img_size=model.img_size, patch_size=model.patch_size, scale=(0.08, 1.0),
                                    pixel_augment=finetune_augment(config.aa))
    loader = data.TrainLoader(train, batch_size=global_batch // jax.process_count(), transform=transform,
                              seed=config.seed, num_workers=config.num_workers)
    schedule = Schedule(config.epochs, min(loader.steps_per_epoch, config.steps_per_epoch or 10**12),
                        config.save_every, config.save_every_steps, config.log_every)
    lr, eff_batch, lr_schedule, make_tx = _optimizer(config, model, schedule, global_batch)
    log.print(f"{config.model}: effective batch {eff_batch}, lr {lr:.3e}; {schedule.steps_per_epoch} steps x "
              f"{config.epochs} epochs; mixup {config.mixup_config().enabled}")
    example = (jax.ShapeDtypeStruct((global_batch, model.img_size, model.img_size, 3), jnp.float32),)
    with jax.set_mesh(mesh):
        state, shardings, tx = create_state(model, make_tx, example, mesh, config.seed)
        if config.finetune:
            state = _load_pretrained(state, config, model, load_params, log)
        checkpoints = RunCheckpoints(config.checkpoint_dir, max_to_keep=config.keep_checkpoints)
        params_loader = None if load_params is None else lambda p: load_params(p, config.model, model.img_size)
        continue_optimizer = None if load_optimizer is None else functools.partial(
            continue_torch_run, load_optimizer, config.model, schedule, config.accum_iter, BETAS, log)
        state = resume(state, abstract_like(state), checkpoints, config.resume, params_loader, log, continue_optimizer)
        step = jit_step(make_finetune_step(model, tx, config), shardings, sharding.batch_sharding(mesh), mesh)
        best = _BestKeeper(Path(config.output_dir) / "best", config.model, log)
        eval_step = evaluate.make_eval_step(logits_fn, config.nb_classes, mesh, {"params": shardings.params})

        def on_epoch_end(epoch: int, state: TrainState, batch: Any) -> dict[str, float]:
            result = evaluate.evaluate(eval_step, {"params": state.params}, val_loader.batches(),
                                       val_loader.num_batches, config.nb_classes, mesh)
            best.offer(result, state, epoch)
            log.print(result.original_lines() + f"\nMax accuracy: {best.acc1:.2f}%")
            return result.metrics()

        trainer = Trainer(step_fn=step, epoch_batches=loader.epoch_batches, mesh=mesh, schedule=schedule,
                          lr_at=lambda s: float(lr_schedule(s // config.accum_iter)), checkpoints=checkpoints,
                          config={"job": "finetune", **dataclasses.asdict(config)}, log=log,
                          images_per_step=global_batch, on_epoch_end=on_epoch_end)
        state = trainer.run(state)
        best.close()
    checkpoints.close()
    log.close()
    return best.result


def _load_pretrained(state: TrainState, config: FinetuneConfig, model: Any, load_params: ParamsLoader | None,
                     log: RunLog) -> TrainState:
    """`--finetune`: the encoder of a pretraining checkpoint (as saved: MAE or ViT), tables resized."""
    if load_params is None:
        raise ValueError("--finetune needs the checkpoint reader (run through main.py)")
    source = load_params(config.finetune, None, model.img_size)
    params, missing, unused = merge_pretrained(state.params, source)
    log.print(f"loaded {config.finetune}\n  missing (freshly initialised): {summarize(missing)}\n"
              f"  unused: {summarize(unused)}")
    return state.replace(params=params)


class _BestKeeper:
    """Keeps the params of the best top-1 so far in their own checkpoint directory."""

    def __init__(self, directory: Path, model_name: str, log: RunLog) -> None:
        self.checkpoints = RunCheckpoints(directory, max_to_keep=1)
        self.model_name, self.log = model_name, log
        self.acc1, self.result = -1.0, None

    def offer(self, result: evaluate.EvalResult, state: TrainState, epoch: int) -> None:
        self.result = result
        if result.acc1 > self.acc1:
            self.acc1 = result.acc1
            meta = {"model": self.model_name, "epoch": epoch, **result.metrics()}
            self.checkpoints.save(int(state.step), {"params": state.params}, {"meta": meta})
            if self.log.enabled:
                result.write_per_class(self.log.output_dir / "per_class_accuracy.json")

    def close(self) -> None:
        self.checkpoints.wait()
        self.checkpoints.close()
