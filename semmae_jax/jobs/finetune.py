"""Fine-tuning and evaluation of ViT classifiers: `python main.py finetune [flags]`.

The original's `main_finetune.py` with its flags: `--finetune PRETRAINED` starts from a
MAE / SemMAE pretraining checkpoint (orbax or `.pth`), `--eval --resume CKPT` only
evaluates, printing `* Acc@1 X Acc@5 Y loss Z` and `Accuracy of the network on the N
test images: X%`. The recipe: layer-wise lr decay, AdamW, warm-up + cosine per step,
drop path, RandAugment and random erasing, mixup / cutmix with label smoothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from semmae_jax import config as config_lib
from semmae_jax import data, flops
from semmae_jax.checkpoint import WeightsReader
from semmae_jax.config import field
from semmae_jax.data import erasing, mixup
from semmae_jax.key_paths import flat_by_path, summarize
from semmae_jax.models import create_model
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.runtime.run_log import RunLog
from semmae_jax.train import evaluate, optim
from semmae_jax.train.flags import (
    ClassifierFlags,
    ComputeFlags,
    DataFlags,
    ModelFlags,
    RematFlags,
    ScheduleFlags,
    TrainFlags,
)
from semmae_jax.train.skeleton import Job, Recipe, train_or_evaluate
from semmae_jax.train.state import TrainState, merge_pretrained, plan_state
from semmae_jax.train.steps import Step, apply_gradients

MIX_STREAM, DROP_STREAM, ERASE_STREAM = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainFlags, DataFlags, ScheduleFlags, ComputeFlags, RematFlags, ClassifierFlags, ModelFlags):
    """Defaults are the original `main_finetune.py`'s."""

    # Model.
    drop_path: float = field(0.1, "stochastic depth rate")
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
    eval_batch_size: int | None = field(None, "evaluation batch per device (default: the training batch's)")

    def eval_batch_geometry(self) -> BatchGeometry:
        """The evaluation's batch: `--eval_batch_size` per device, or the training batch's geometry."""
        if self.eval_batch_size is None:
            return self.batch_geometry()
        return BatchGeometry.from_flags(self.eval_batch_size, flags=("--eval_batch_size", "--eval_batch_size"))

    def mixup_config(self) -> mixup.MixupConfig:
        return mixup.MixupConfig(
            mixup=self.mixup, cutmix=self.cutmix, cutmix_minmax=self.cutmix_minmax, mixup_prob=self.mixup_prob,
            mixup_switch_prob=self.mixup_switch_prob, mixup_mode=self.mixup_mode, smoothing=self.smoothing,
            nb_classes=self.nb_classes,
        )


def parse(argv: Sequence[str]) -> FinetuneConfig:
    return config_lib.parse_job_config(argv, FinetuneConfig, "main.py finetune", __doc__,
                                       aliases={"--cls_token": ("global_pool", False)})


def main(argv: Sequence[str], reader: WeightsReader | None = None) -> None:
    """`python main.py finetune ...` (and `main.py eval ...`, which adds `--eval`); `reader` reads
    `.pth` checkpoints (`--finetune`, `--resume`, with an original run's AdamW state)."""
    config = parse(argv)
    config_lib.one_line_errors("main.py finetune", lambda c: train_or_evaluate(FinetuneJob(c, reader)), config)


def eval_main(argv: Sequence[str], reader: WeightsReader | None = None) -> None:
    """`python main.py eval ...`: `finetune --eval`."""
    main(["--eval", *argv], reader)


def build_classifier(config: FinetuneConfig, **stated: Any) -> nn.Module:
    """The classifier of the flags (and the numerics fields a checkpoint states, for `eval`)."""
    return create_model(config.model, img_size=config.input_size, in_chans=config.in_chans, num_classes=config.nb_classes,
                        global_pool=config.global_pool, drop_path_rate=config.drop_path, dtype=config.dtype,
                        remat=config.remat, attention=config.attention, **stated)


def validation(config: FinetuneConfig, model: nn.Module, mesh: jax.sharding.Mesh,
               params_sharding: Any, class_names: Sequence[str] | None = None) -> evaluate.Validation:
    """The validation split, scored by the classifier's logits (refused when `class_names`, the
    checkpoint's, order the dataset's class folders differently)."""
    bands = config.bands(model.in_chans)
    val = data.open_source(config.data_paths()[0], "val", dataset=config.dataset, tfds_data_dir=config.tfds_data_dir,
                           labelled=True, bands=bands)
    evaluate.check_classes(val.num_classes, config.nb_classes)
    evaluate.check_class_order(getattr(val, "classes", None), class_names, config.resume)
    return evaluate.Validation.build(
        val, data.EvalTransform(model.img_size, bands=bands), config.eval_batch_geometry(),
        config.num_workers, lambda variables, images: model.apply(variables, images, train=False),
        config.nb_classes, mesh, {"params": params_sharding})


# ---------------------------------------------------------------- the step


def make_finetune_step(model: Any, tx: optax.GradientTransformation, config: FinetuneConfig) -> Step:
    """`step(state, batch) -> (state, metrics)`: erase, mix, forward with drop path, update."""
    mix = config.mixup_config()
    erase = erasing.ErasingConfig(reprob=config.reprob, remode=config.remode, recount=config.recount)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        images = batch["image"]
        if config.reprob > 0:
            images = erasing.random_erasing(state.step_key(ERASE_STREAM), images, erase)
        images, targets = mixup.mixup(state.step_key(MIX_STREAM), images, batch["label"], mix)

        def loss_fn(params: Any) -> jax.Array:
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": state.step_key(DROP_STREAM)})
            return mixup.soft_target_cross_entropy(logits, targets)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        state, refused = apply_gradients(state, tx, grads, loss)
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **refused}

    return step


# ---------------------------------------------------------------- the jobs


class FinetuneJob(Job):
    """Fine-tuning: `--finetune` weights, layer-decay AdamW, augmentation, evaluation and the best model."""

    name = "finetune"
    betas = (0.9, 0.999)  # AdamW's, as the original's fine-tuning
    defining = Job.defining | {"nb_classes", "global_pool", "finetune"}

    def build_model(self) -> nn.Module:
        return build_classifier(self.config)

    def train_data(self, model: nn.Module) -> tuple[Any, Any]:
        from semmae_jax.data.augment import finetune_augment

        c = self.config
        bands = c.bands(model.in_chans)
        train = data.open_source(c.data_paths()[0], "train", dataset=c.dataset, tfds_data_dir=c.tfds_data_dir,
                                 labelled=True, bands=bands)
        return train, data.TrainTransform(img_size=model.img_size, patch_size=model.patch_size, scale=(0.08, 1.0),
                                          pixel_augment=finetune_augment(c.aa), bands=bands)

    def _scales(self, params: Any) -> Any:
        return optim.layer_decay_scales(params, self.build_model().depth, self.config.layer_decay)

    def optimizer(self, params: Any, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
        c = self.config
        return optim.adamw(params, lr_schedule, weight_decay=c.weight_decay, betas=self.betas,
                           lr_scales=self._scales(params), clip_grad=c.clip_grad)

    def param_groups(self, params: Any) -> list[str]:
        return optim.describe_param_groups(params, self._scales(params))

    def describe(self, recipe: Recipe) -> str:
        return f"mixup / cutmix {self.config.mixup_config().enabled}, RandAugment {self.config.aa}"

    def start(self, state: TrainState, recipe: Recipe) -> TrainState:
        """`--finetune`: the encoder of a pretraining checkpoint (as saved: MAE or ViT), tables resized."""
        if not self.config.finetune:
            return state
        if self.reader is None:
            raise ValueError("--finetune needs the checkpoint reader (run through main.py)")
        source = self.reader.params_for_model(self.config.finetune, None, recipe.model.img_size)
        params, missing, unused = merge_pretrained(state.params, source)
        recipe.log.print(f"loaded {self.config.finetune}\n  missing (freshly initialised): {summarize(missing)}\n"
                      f"  unused: {summarize(unused)}")
        return state.replace(params=params)

    def flops_per_image(self, recipe: Recipe) -> float:
        return flops.train_flops(recipe.model)

    def step(self, recipe: Recipe, tx: optax.GradientTransformation) -> Step:
        return make_finetune_step(recipe.model, tx, self.config)

    def epoch_end_hook(self, recipe: Recipe) -> evaluate.EpochEvaluation:
        return evaluate.EpochEvaluation.keeping_best(
            validation(self.config, recipe.model, recipe.mesh, recipe.shardings.params),
            lambda state: {"params": state.params}, self.config.model, recipe.log)

    def result(self, state: TrainState, recipe: Recipe, hook: evaluate.EpochEvaluation) -> evaluate.EvalResult | None:
        return hook.last

    def evaluation(self, mesh: jax.sharding.Mesh, log: RunLog) -> evaluate.Evaluation:
        """`--eval --resume CKPT`: the checkpoint must be exactly this classifier (keys and shapes),
        built with the numerics fields the checkpoint states."""
        c = self.config
        if not c.resume or c.resume == "auto" or self.reader is None:
            raise ValueError("--eval needs --resume CHECKPOINT (a .pth, an orbax checkpoint or a run directory)")
        source, stated = self.reader.params_as_saved(c.resume, c.input_size)
        model = build_classifier(c, **stated.fields)
        if stated.fields:
            log.print(f"model fields stated by {c.resume}: {stated.fields}")
        example = (jax.ShapeDtypeStruct((1, *model.image_hw, model.in_chans), jnp.float32),)
        plan = plan_state(model, lambda params: optax.identity(), example, mesh, c.seed)
        params, missing, unused = merge_pretrained(plan.abstract.params, source)
        if missing or unused:
            raise ValueError(f"{c.resume} does not fit {c.model} (--nb_classes {c.nb_classes}, "
                             f"global_pool {c.global_pool}): {_mismatch(missing, unused, plan.abstract.params)}")
        names = stated.class_names if stated.class_names and len(stated.class_names) == c.nb_classes else None
        return evaluate.Evaluation(validation(c, model, mesh, plan.shardings.params, names), {"params": params},
                                   names)


def _mismatch(missing: list[str], unused: list[str], model_params: Any) -> str:
    """What `merge_pretrained` could not take, with a parameter of another shape named once, as such."""
    shapes = {path: tuple(x.shape) for path, x in flat_by_path(model_params).items()}
    other = sorted(set(missing) & set(unused))
    parts = [f"other shape: {', '.join(f'{p} (model {shapes[p]})' for p in other)}" if other else "",
             f"missing {sorted(set(missing) - set(other))}" if set(missing) - set(other) else "",
             f"unexpected {sorted(set(unused) - set(other))}" if set(unused) - set(other) else ""]
    return "; ".join(p for p in parts if p)
