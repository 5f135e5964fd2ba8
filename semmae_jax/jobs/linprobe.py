"""Linear probing of a pretrained encoder: `python main.py linprobe [flags]`.

The original `main_linprobe.py`: the encoder frozen (cls-token features by default),
BatchNorm without affine before a Linear head, LARS (trust 0.001, momentum 0.9) with
warm-up + cosine, only RandomResizedCrop + flip as augmentation, cross-entropy.
The frozen encoder's params ride in the state's `frozen` field (an input of the jitted
step, never trained nor checkpointed): only the head's params, BatchNorm statistics and
LARS momentum are trained and saved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from semmae_jax import checkpoint, data, flops
from semmae_jax import config as config_lib
from semmae_jax.checkpoint import ResumeTarget, WeightsReader
from semmae_jax.config import field
from semmae_jax.key_paths import summarize
from semmae_jax.models import create_model
from semmae_jax.models.vit import ProbeHead
from semmae_jax.runtime.run_log import RunLog
from semmae_jax.train import evaluate, optim
from semmae_jax.train.flags import ClassifierFlags, ComputeFlags, DataFlags, ModelFlags, ScheduleFlags, TrainFlags
from semmae_jax.train.skeleton import Job, Recipe, build_recipe, train_or_evaluate
from semmae_jax.train.state import TrainState, merge_pretrained, plan_state
from semmae_jax.train.steps import Step, apply_gradients


@dataclasses.dataclass(frozen=True)
class LinprobeConfig(TrainFlags, DataFlags, ScheduleFlags, ComputeFlags, ClassifierFlags, ModelFlags):
    """Defaults are the original `main_linprobe.py`'s."""

    global_pool: bool = field(False, "mean-pooled features instead of the cls token")
    batch_size: int = field(512)
    epochs: int = field(90)
    warmup_epochs: int = field(10)
    blr: float = field(0.1)
    weight_decay: float = field(0.0)
    finetune: str | None = field(None, "pretrained checkpoint whose encoder is probed (orbax dir, run dir or .pth)")
    eval: bool = field(False, "evaluate the probe of --resume and stop")


def parse(argv: Sequence[str]) -> LinprobeConfig:
    return config_lib.parse_job_config(argv, LinprobeConfig, "main.py linprobe", __doc__,
                                       aliases={"--cls_token": ("global_pool", False)})


def main(argv: Sequence[str], reader: WeightsReader | None = None) -> None:
    """`python main.py linprobe ...`; `reader` reads the `--finetune` checkpoint."""
    config_lib.one_line_errors("main.py linprobe", lambda c: train_or_evaluate(LinprobeJob(c, reader)), parse(argv))


def make_probe_step(encoder: nn.Module, head: ProbeHead, tx: optax.GradientTransformation) -> Step:
    """`step(state, batch) -> (state, metrics)`: frozen features (from `state.frozen`), head update."""

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        features = jax.lax.stop_gradient(encoder.apply({"params": state.frozen}, batch["image"]))

        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            logits, updates = head.apply({"params": params, **state.model_state}, features, train=True,
                                         mutable=["batch_stats"])
            labels = jax.nn.one_hot(batch["label"], logits.shape[-1])
            return optax.softmax_cross_entropy(logits, labels).mean(), updates

        (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state, refused = apply_gradients(state, tx, grads, loss, model_state=model_state)
        return state, {"loss": loss, **refused}

    return step


class LinprobeJob(Job):
    """Linear probing: the state is the head; the encoder comes from `--finetune` and stays frozen."""

    name = "linprobe"
    defining = Job.defining | {"nb_classes", "global_pool", "finetune"}

    def __init__(self, config: LinprobeConfig, reader: WeightsReader | None = None) -> None:
        super().__init__(config, reader)
        self.encoder = create_model(config.model, img_size=config.input_size, in_chans=config.in_chans, num_classes=0,
                                    global_pool=config.global_pool, dtype=config.dtype, attention=config.attention)

    def build_model(self) -> nn.Module:
        return ProbeHead(self.config.nb_classes)

    def example_inputs(self, recipe: Recipe) -> tuple[jax.ShapeDtypeStruct, ...]:
        return (jax.ShapeDtypeStruct((recipe.batch.global_batch, self.encoder.embed_dim), jnp.float32),)

    def train_data(self, model: nn.Module) -> tuple[Any, Any]:
        c, size, bands = self.config, self.encoder.img_size, self.config.bands(self.encoder.in_chans)
        source = data.open_source(c.data_paths()[0], "train", dataset=c.dataset, tfds_data_dir=c.tfds_data_dir,
                                  labelled=True, bands=bands)
        return source, data.TrainTransform(img_size=size, patch_size=self.encoder.patch_size, scale=(0.08, 1.0),
                                           bands=bands)

    def optimizer(self, params: Any, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
        return optim.lars(params, lr_schedule, weight_decay=self.config.weight_decay)

    def resume_target(self, recipe: Recipe) -> ResumeTarget | None:
        return None  # the state is a probe: --resume takes a linprobe run directory

    def start(self, state: TrainState, recipe: Recipe) -> TrainState:
        return state.replace(frozen=self._frozen_encoder(recipe.mesh, recipe.log))

    def _frozen_encoder(self, mesh: jax.sharding.Mesh, log: RunLog) -> Any:
        """The encoder's params, placed on `mesh`: every one must come from `--finetune`."""
        c = self.config
        if not c.finetune or self.reader is None:
            raise ValueError("linear probing needs --finetune PRETRAINED (an orbax checkpoint or a .pth)")
        images = jax.ShapeDtypeStruct((1, *self.encoder.image_hw, self.encoder.in_chans), jnp.float32)
        plan = plan_state(self.encoder, lambda p: optax.identity(), (images,), mesh, c.seed)
        params, missing, unused = merge_pretrained(plan.abstract.params,
                                                   self.reader.params_for_model(c.finetune, None, self.encoder.img_size))
        if missing:
            raise ValueError(f"{c.finetune} lacks encoder parameters {missing} of {c.model}")
        log.print(f"probing the encoder of {c.finetune}; unused: {summarize(unused)}")
        return params

    def flops_per_image(self, recipe: Recipe) -> float:
        """The frozen encoder's forward (no backward through it) and the head's forward + backward."""
        return flops.forward_flops(self.encoder) + 3 * flops.head_flops(self.encoder.embed_dim, self.config.nb_classes)

    def step(self, recipe: Recipe, tx: optax.GradientTransformation) -> Step:
        return make_probe_step(self.encoder, recipe.model, tx)

    def _validation(self, mesh: jax.sharding.Mesh, shardings: TrainState) -> evaluate.Validation:
        """The validation split scored by the probe on the frozen encoder, for states placed as `shardings`."""
        c, encoder, head = self.config, self.encoder, self.build_model()
        bands = c.bands(encoder.in_chans)
        val = data.open_source(c.data_paths()[0], "val", dataset=c.dataset, tfds_data_dir=c.tfds_data_dir, labelled=True,
                               bands=bands)
        evaluate.check_classes(val.num_classes, c.nb_classes)

        def logits_fn(variables: Any, images: jax.Array) -> jax.Array:
            return head.apply(variables["head"], encoder.apply({"params": variables["encoder"]}, images), train=False)

        return evaluate.Validation.build(val, data.EvalTransform(encoder.img_size, bands=bands), c.batch_geometry(),
                                         c.num_workers,
                                         logits_fn, c.nb_classes, mesh, _variables(shardings))

    def epoch_end_hook(self, recipe: Recipe) -> evaluate.EpochEvaluation:
        return evaluate.EpochEvaluation.keeping_best(self._validation(recipe.mesh, recipe.shardings),
                                                     _variables, self.config.model, recipe.log)

    def result(self, state: TrainState, recipe: Recipe, hook: evaluate.EpochEvaluation) -> evaluate.EvalResult | None:
        return hook.last

    def evaluation(self, mesh: jax.sharding.Mesh, log: RunLog) -> evaluate.Evaluation:
        """`--eval`: the probe of `--resume` (a linprobe run; default: this output dir's run) on the
        frozen encoder of `--finetune`."""
        c = self.config
        built = build_recipe(self, self.build_model(), c.batch_geometry(), 1, mesh)
        plan = plan_state(built.model, built.make_tx, self.example_inputs(built), mesh, c.seed)
        run = c.resume if c.resume not in (None, "auto", "scratch") else str(c.checkpoint_dir)
        probe = checkpoint.restore_latest(run, plan.abstract).replace(frozen=self._frozen_encoder(mesh, log))
        log.print(f"scoring the probe of {run} (step {int(probe.step)})")
        return evaluate.Evaluation(self._validation(mesh, jax.tree.map(lambda x: x.sharding, probe)),
                                   _variables(probe))


def _variables(state: TrainState) -> dict[str, Any]:
    return {"encoder": state.frozen, "head": {"params": state.params, **state.model_state}}
