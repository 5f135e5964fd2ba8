"""Linear probing of a pretrained encoder: `python main.py linprobe [flags]`.

The original `main_linprobe.py`: the encoder frozen (cls-token features by default),
BatchNorm without affine before a Linear head, LARS (trust 0.001, momentum 0.9) with
warm-up + cosine, only RandomResizedCrop + flip as augmentation, cross-entropy.
The frozen encoder's params are an input of the jitted step, not part of the
optimizer's state: only the head's params, BatchNorm statistics and LARS momentum
are trained and checkpointed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from semmae_jax import config as config_lib
from semmae_jax import sharding
from semmae_jax.checkpoint import RunCheckpoints, abstract_like
from semmae_jax.config import field
from semmae_jax.metrics_log import RunLog
from semmae_jax.models import create_model
from semmae_jax.models.vit import ProbeHead
from semmae_jax.paths import summarize
from semmae_jax.train import evaluate, optim
from semmae_jax.train.finetune import ParamsLoader, check_classes, merge_pretrained
from semmae_jax.train.flags import DataFlags, RunFlags, ScheduleFlags
from semmae_jax.train.loop import Schedule, Trainer, resume
from semmae_jax.train.state import TrainState, create_state, plan_state


@dataclasses.dataclass(frozen=True)
class LinprobeConfig(RunFlags, DataFlags, ScheduleFlags):
    """Defaults are the original `main_linprobe.py`'s."""

    model: str = field("vit_large_patch16", "registered classifier name (its encoder is probed)")
    input_size: int = field(224, "image size")
    global_pool: bool = field(False, "mean-pooled features instead of the cls token")
    nb_classes: int = field(1000, "number of classes")
    dtype: str = field("float32", "compute dtype of the encoder", choices=("float32", "bfloat16"))
    batch_size: int = field(512)
    epochs: int = field(90)
    warmup_epochs: int = field(10)
    blr: float = field(0.1)
    weight_decay: float = field(0.0)
    finetune: str | None = field(None, "pretrained checkpoint whose encoder is probed (orbax dir or .pth)")
    eval: bool = field(False, "evaluate the probe of --resume and stop")
    dist_eval: bool = field(False, "accepted for the original's command lines: evaluation is always distributed")


def parse(argv: Sequence[str]) -> LinprobeConfig:
    return config_lib.parse_job_config(argv, LinprobeConfig, "main.py linprobe", __doc__,
                                       aliases={"--cls_token": ("global_pool", False)})


def main(argv: Sequence[str], load_params: ParamsLoader | None = None) -> None:
    config_lib.run_job("main.py linprobe", run, parse(argv), load_params)


def make_probe_step(encoder: Any, head: ProbeHead, tx: optax.GradientTransformation) -> Callable:
    """`step(state, batch, encoder_params) -> (state, metrics)`: frozen features, head update."""

    def step(state: TrainState, batch: dict[str, jax.Array], encoder_params: Any) -> tuple[TrainState, dict]:
        features = jax.lax.stop_gradient(encoder.apply({"params": encoder_params}, batch["image"]))

        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            logits, updates = head.apply({"params": params, **state.model_state}, features, train=True,
                                         mutable=["batch_stats"])
            labels = jax.nn.one_hot(batch["label"], logits.shape[-1])
            return optax.softmax_cross_entropy(logits, labels).mean(), updates

        (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, model_state=model_state)
        return new_state, {"loss": loss}

    return step


def run(config: LinprobeConfig, load_params: ParamsLoader | None = None) -> evaluate.EvalResult | None:
    """The linear-probing job, phase by phase (as `pretrain.run`); the final evaluation, None with `--eval` off."""
    config.start_runtime()
    from semmae_jax import data

    mesh = sharding.make_mesh(config.mesh)
    log = RunLog(config.output_dir, config.log_dir)
    encoder = create_model(config.model, img_size=config.input_size, num_classes=0, global_pool=config.global_pool,
                           dtype=config.dtype)
    head = ProbeHead(config.nb_classes)
    data_path = config.resolved_data_path()
    sources = {split: data.open_source(data_path, split, dataset=config.dataset, tfds_data_dir=config.tfds_data_dir)
               for split in ("train", "val")}
    check_classes(sources["val"].num_classes, config.nb_classes)
    global_batch = config.batch_size * jax.device_count()
    sharding.check_global_batch(global_batch, mesh)
    local = global_batch // jax.process_count()
    loader = data.TrainLoader(sources["train"], batch_size=local, seed=config.seed, num_workers=config.num_workers,
                              transform=data.TrainTransform(img_size=encoder.img_size, patch_size=encoder.patch_size,
                                                            scale=(0.08, 1.0)))
    val_loader = data.EvalLoader(sources["val"], batch_size=local, transform=data.EvalTransform(encoder.img_size),
                                 num_workers=config.num_workers)
    schedule = Schedule(config.epochs, min(loader.steps_per_epoch, config.steps_per_epoch or 10**12),
                        config.save_every, 0, config.log_every)
    lr, eff_batch = config.learning_rate(global_batch)
    lr_schedule = optim.warmup_cosine(lr, config.min_lr, config.warmup_epochs * schedule.steps_per_epoch,
                                      schedule.total_steps)
    log.print(f"linear probe of {config.model}: effective batch {eff_batch}, lr {lr:.3e}")
    features = jax.ShapeDtypeStruct((global_batch, encoder.embed_dim), jnp.float32)
    images = jax.ShapeDtypeStruct((global_batch, encoder.img_size, encoder.img_size, 3), jnp.float32)
    with jax.set_mesh(mesh):
        encoder_params = _encoder_params(encoder, images, mesh, config, load_params, log)
        state, shardings, tx = create_state(head, lambda p: optim.lars(p, lr_schedule, weight_decay=config.weight_decay),
                                            (features,), mesh, config.seed)
        checkpoints = RunCheckpoints(config.checkpoint_dir, max_to_keep=config.keep_checkpoints)
        state = resume(state, abstract_like(state), checkpoints, config.resume, None, log)
        replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        encoder_sharding = jax.tree.map(lambda x: x.sharding, encoder_params)
        probe = jax.jit(sharding.with_logical_rules(make_probe_step(encoder, head, tx)),
                        in_shardings=(shardings, batch_sharding, encoder_sharding),
                        out_shardings=(shardings, replicated), donate_argnums=(0,))

        def logits_fn(variables: Any, images: jax.Array) -> jax.Array:
            feats = encoder.apply({"params": variables["encoder"]}, images)
            return head.apply(variables["head"], feats, train=False)

        def variables(state: TrainState) -> dict[str, Any]:
            return {"encoder": encoder_params, "head": {"params": state.params, **state.model_state}}

        eval_step = evaluate.make_eval_step(logits_fn, config.nb_classes, mesh,
                                            jax.tree.map(lambda x: x.sharding, variables(state)))

        def run_eval(state: TrainState) -> evaluate.EvalResult:
            return evaluate.evaluate(eval_step, variables(state), val_loader.batches(), val_loader.num_batches,
                                     config.nb_classes, mesh)

        if config.eval:
            result = run_eval(state)
            log.print(result.original_lines())
            return result
        results = []

        def on_epoch_end(epoch: int, state: TrainState, batch: Any) -> dict[str, float]:
            results.append(run_eval(state))
            log.print(results[-1].original_lines() + f"\nMax accuracy: {max(r.acc1 for r in results):.2f}%")
            return results[-1].metrics()

        trainer = Trainer(step_fn=lambda s, b, _: probe(s, b, encoder_params), epoch_batches=loader.epoch_batches,
                          mesh=mesh, schedule=schedule, lr_at=lambda s: float(lr_schedule(s)), checkpoints=checkpoints,
                          config={"job": "linprobe", **dataclasses.asdict(config)}, log=log,
                          images_per_step=global_batch, on_epoch_end=on_epoch_end)
        trainer.run(state)
    checkpoints.close()
    log.close()
    return results[-1] if results else None


def _encoder_params(encoder: Any, images: jax.ShapeDtypeStruct, mesh: jax.sharding.Mesh, config: LinprobeConfig,
                    load_params: ParamsLoader | None, log: RunLog) -> Any:
    """The frozen encoder: every encoder parameter must come from `--finetune`."""
    if not config.finetune or load_params is None:
        raise ValueError("linear probing needs --finetune PRETRAINED (an orbax checkpoint or a .pth)")
    plan = plan_state(encoder, lambda p: optax.identity(), (images,), mesh, config.seed)
    params, missing, unused = merge_pretrained(plan.abstract.params, load_params(config.finetune, None, encoder.img_size))
    if missing:
        raise ValueError(f"{config.finetune} lacks encoder parameters {missing} of {config.model}")
    log.print(f"probing the encoder of {config.finetune}; unused: {summarize(unused)}")
    return params
