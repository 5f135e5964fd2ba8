"""The one skeleton every training job calls.

A job (`pretrain.py`, `finetune.py`, `linprobe.py`, `parts.py`) is a `Job`: its config,
model, training data, optimizer, step function and hooks. `train(job)` does the rest,
each phase once and in this order:

    runtime -> mesh, the run directory's lock and log -> data -> recipe (length, lr,
    optimizer) -> sharded state -> restore -> jitted step -> loop -> close

A *run* is one output directory and what lives in it (its lock, log, checkpoints and
saved config); the `Recipe` is what the skeleton builds for the job's hooks.
`evaluate_weights(job)` is every job's `--eval`: runtime -> mesh and log -> the job's
`evaluation` (weights and validation split) -> report.

Closing (checkpoint manager, TensorBoard writer) happens on every way out, errors
included (`contextlib.ExitStack`). `--accum_iter` means the same in every job: the
optimizer update comes every `accum_iter` micro-batches (`optim.accumulate`), the lr
follows the effective batch, and the lr schedule counts updates (`TrainingLength`, the one
place micro-batches become updates).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from semmae_jax import checkpoint, data, sharding
from semmae_jax.checkpoint import ResumeTarget, RunCheckpoints, RunIdentity, WeightsReader
from semmae_jax.checkpoint.local import LocalCheckpoints
from semmae_jax.runtime import host_memory
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.runtime.distributed import is_primary
from semmae_jax.runtime.run_lock import run_lock
from semmae_jax.runtime.run_log import RunLog
from semmae_jax.train import evaluate, optim
from semmae_jax.train.instruments import Instruments, Stopwatch
from semmae_jax.train.loop import Cadence, Trainer
from semmae_jax.train.state import TrainState, create_state
from semmae_jax.train.steps import Step, jit_step
from semmae_jax.training_length import TrainingLength


@dataclasses.dataclass
class Recipe:
    """What the skeleton has built for the job (its length, lr, optimizer, mesh, model), handed to its hooks."""

    mesh: jax.sharding.Mesh
    log: RunLog | None  # None outside `train` (`parity --train` builds the recipe without a run directory)
    model: nn.Module
    batch: BatchGeometry  # per device, global, per process, per optimizer update
    length: TrainingLength  # epochs of micro-batches, optimizer updates, the lr at any step
    cadence: Cadence  # when the loop logs and saves
    make_tx: Callable[[Any], optax.GradientTransformation]  # params -> the job's optimizer with accumulation
    shardings: TrainState | None = None  # once the state exists


class Job(abc.ABC):
    """What makes a training job its own; `train` does everything else.

    `config` is the job's config dataclass (it inherits `TrainFlags`, `DataFlags` and
    `ScheduleFlags`); `reader` reads files that are not orbax checkpoints (`.pth`, ...).
    """

    name: ClassVar[str]
    betas: ClassVar[tuple[float, float] | None] = None  # AdamW's, to continue an original `.pth` run
    # Flags that make a run another run: resuming with any of them changed is refused.
    defining: ClassVar[frozenset[str]] = frozenset(
        {"job", "model", "input_size", "seed", "batch_size", "global_batch_size", "accum_iter", "data_path", "dataset"})

    def __init__(self, config: Any, reader: WeightsReader | None = None) -> None:
        self.config = config
        self.reader = reader

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The model the step trains."""

    @abc.abstractmethod
    def train_data(self, model: nn.Module) -> tuple[Any, Any]:
        """(training source, transform), opened once the runtime has started."""

    @abc.abstractmethod
    def optimizer(self, params: Any, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
        """The optimizer recipe for one update (accumulation is added by the skeleton)."""

    @abc.abstractmethod
    def step(self, recipe: Recipe, tx: optax.GradientTransformation) -> Step:
        """`step(state, batch) -> (state, metrics)`, not yet jitted."""

    def param_groups(self, params: Any) -> list[str]:
        """One line per parameter: how the optimizer treats it (logged once, in `param_placement.txt`)."""
        return optim.describe_param_groups(params)

    def example_inputs(self, recipe: Recipe) -> tuple[jax.ShapeDtypeStruct, ...]:
        """What `model.init` is traced with: a global batch of images."""
        model = recipe.model
        return (jax.ShapeDtypeStruct((recipe.batch.global_batch, *model.image_hw, model.in_chans), jnp.float32),)

    def describe(self, recipe: Recipe) -> str:
        """The job's own start-up line (after the shared one)."""
        return ""

    def start(self, state: TrainState, recipe: Recipe) -> TrainState:
        """The fresh state with what the job starts from (pretrained weights), before the resume order."""
        return state

    def epoch_end_hook(self, recipe: Recipe) -> Any:
        """`hook(epoch, state, first_batch) -> extra log values`, or None; built once the state exists.

        The skeleton closes it at the end (if it has `close`) and hands it to `result`: what the
        job returns (an evaluation) lives on the hook, not on the job."""
        return None

    def resume_target(self, recipe: Recipe) -> ResumeTarget | None:
        """What a `--resume` weights file must fit; None: `--resume` takes run directories only."""
        return ResumeTarget(self.config.model, recipe.model.img_size, recipe.length, self.betas)

    def flops_per_image(self, recipe: Recipe) -> float | None:
        """Model FLOPs of one image's training step (`semmae_jax.flops`), for TFLOP/s and MFU; None: not counted."""
        return None

    def evaluation(self, mesh: jax.sharding.Mesh, log: RunLog) -> evaluate.Evaluation:
        """`--eval`: the weights to score and the validation split (`evaluate_weights` scores them)."""
        raise ValueError(f"main.py {self.name} has no --eval")

    def result(self, state: TrainState, recipe: Recipe, hook: Any) -> Any:
        """What `train` returns (pretraining: the state; fine-tuning: the last evaluation), from
        the final state and the epoch-end hook."""
        return state

    def saved_config(self) -> dict[str, Any]:
        """The run's config, saved with every checkpoint (and compared on resume)."""
        return {"job": self.name, **dataclasses.asdict(self.config)}


def train(job: Job) -> Any:
    """Train `job` phase by phase; returns `job.result(...)`."""
    watch = Stopwatch()  # the goodput record's clock: start-up begins here
    config = job.config
    config.start_runtime()  # runtime: join the processes before anything touches a device

    with contextlib.ExitStack() as closing:
        mesh = sharding.make_mesh(config.mesh)  # mesh, the run directory's lock, and log
        closing.enter_context(run_lock(config.output_dir, enabled=is_primary()))
        log = closing.enter_context(contextlib.closing(RunLog(config.output_dir, config.log_dir)))
        model = job.build_model()
        batch = config.batch_geometry()  # data
        sharding.check_global_batch(batch.global_batch, mesh)
        source, transform = job.train_data(model)  # TensorFlow starts here, after jax.distributed
        loader = data.TrainLoader(source, process_batch=batch.per_process, seed=config.seed,
                                  transform=transform, num_workers=config.num_workers)
        built = build_recipe(job, model, batch, loader.steps_per_epoch, mesh, log)  # length, lr, optimizer
        log.print(f"{job.name} {getattr(config, 'model', '')}: {batch.describe()}; lr {built.length.peak_lr:.3e}; "
                  f"mesh {dict(mesh.shape)}; "
                  f"{built.length.steps_per_epoch} steps per epoch, {config.epochs} epochs; {host_memory.describe()}")
        if described := job.describe(built):
            log.print(described)
        with jax.set_mesh(mesh):
            state, tx = fresh_state(job, built)  # sharded state
            _log_placement(log, job, state, built.shardings)
            state = job.start(state, built)
            built.shardings = jax.tree.map(lambda x: x.sharding, state)  # with what `start` added
            checkpoints = closing.enter_context(contextlib.closing(  # restore
                RunCheckpoints(config.checkpoint_dir, max_to_keep=config.keep_checkpoints)))
            local = closing.enter_context(contextlib.closing(LocalCheckpoints(  # each host's own, --local_save_every
                config.local_checkpoint_root, config.local_save_every, mesh))) if config.local_save_every else None
            identity = RunIdentity(json.loads(json.dumps(job.saved_config())), job.defining, config.allow_config_change)
            with watch.phase("restore"):
                state = checkpoint.resume(state, checkpoints, config.resume, job.reader, job.resume_target(built), log,
                                          identity, local)
            check_run_plan(config, built.length, int(state.step), log)
            hook = job.epoch_end_hook(built)
            if hasattr(hook, "close"):
                closing.callback(hook.close)
            step = jitted_step(job, built, tx, built.shardings)  # jitted step
            trainer = Trainer(step_fn=step, epoch_batches=loader.epoch_batches, mesh=mesh,  # loop
                              length=built.length, cadence=built.cadence,
                              checkpoints=checkpoints, config=job.saved_config(), log=log,
                              instruments=Instruments.for_run(config, log, batch.global_batch,
                                                              job.flops_per_image(built), watch),
                              on_epoch_end=hook,
                              max_nonfinite_steps=config.max_nonfinite_steps, local=local)
            state = trainer.train(state)
            return job.result(state, built, hook)


def train_or_evaluate(job: Job) -> Any:
    """`evaluate_weights(job)` under `--eval`, else `train(job)`: the classification jobs' entry."""
    return evaluate_weights(job) if job.config.eval else train(job)


def evaluate_weights(job: Job) -> evaluate.EvalResult:
    """`--eval`, for every job that has it: score the weights `job.evaluation` names on the
    validation split and report as `main_finetune.py --eval` does (`evaluate.report`); no
    training split is opened, nothing is trained or saved but the report."""
    config = job.config
    config.start_runtime()
    mesh = sharding.make_mesh(config.mesh)
    with contextlib.closing(RunLog(config.output_dir, config.log_dir)) as log, jax.set_mesh(mesh):
        scored = job.evaluation(mesh, log)
        result = scored.validation(scored.variables)
        evaluate.report(result, log, scored.class_names)
    return result


def build_recipe(job: Job, model: nn.Module, batch: BatchGeometry, loader_steps: int, mesh: jax.sharding.Mesh,
           log: RunLog | None = None) -> Recipe:
    """The job's training recipe as `train` trains it: the run's length in micro-batches, its lr
    schedule in optimizer updates and the optimizer with `--accum_iter` (`Recipe.make_tx`).

    Built in this one place so that `parity --train` compares exactly what a run trains with.
    """
    config = job.config
    lr = config.learning_rate(batch)
    steps_per_epoch = min(loader_steps, config.steps_per_epoch or loader_steps)
    length = TrainingLength(epochs=config.epochs, steps_per_epoch=steps_per_epoch, accum_iter=config.accum_iter,
                            warmup_epochs=config.warmup_epochs, peak_lr=lr, min_lr=config.min_lr)
    cadence = Cadence(save_every=config.save_every, save_every_steps=config.save_every_steps,
                      log_every=config.log_every)

    def make_tx(params: Any) -> optax.GradientTransformation:
        return optim.accumulate(job.optimizer(params, length.lr_schedule()), length.accum_iter)

    return Recipe(mesh, log, model, batch, length, cadence, make_tx)


def fresh_state(job: Job, recipe: Recipe, init_params: Any = None) -> tuple[TrainState, optax.GradientTransformation]:
    """The job's fresh sharded state and its optimizer under `recipe` (the state's shardings are
    recorded on it), from `init_params` (host arrays) instead of the job's initialisation when
    given. Call under `jax.set_mesh(recipe.mesh)`."""
    state, recipe.shardings, tx = create_state(recipe.model, recipe.make_tx, job.example_inputs(recipe), recipe.mesh,
                                               job.config.seed, init_params=init_params)
    return state, tx


def jitted_step(job: Job, recipe: Recipe, tx: optax.GradientTransformation, shardings: TrainState) -> Step:
    """The job's step, jitted for states placed as `shardings` and global batches on `recipe.mesh`."""
    return jit_step(job.step(recipe, tx), shardings, sharding.batch_sharding(recipe.mesh), recipe.mesh)


def check_run_plan(config: Any, length: TrainingLength, start_step: int, log: RunLog) -> None:
    """Hold every flag that names steps, epochs or a window against the run it is given, before
    the first step: a profiler window past the run's end is refused (ValueError, one line); a
    period longer than the run, or a resume past its end, is said in one line of what will happen."""
    end = length.total_steps
    run = f"{length.epochs} epochs of {length.steps_per_epoch} steps = {end} steps"
    if (window := config.profile_range) is not None and window[1] > end:
        raise ValueError(f"--profile_steps {config.profile_steps}: this run ends at step {end} ({run}); give a window "
                         f"A:B with B <= {end}, or fewer devices / a smaller batch for more steps an epoch")
    if start_step >= end:
        log.print(f"the checkpoint resumed (step {start_step}) already completes this run ({run}): nothing to train; "
                  f"raise --epochs to train further")
        return
    if window is not None and window[1] <= start_step:
        log.print(f"--profile_steps {config.profile_steps}: the window lies before the resumed step {start_step}; "
                  f"no trace is taken")
    periods = [("--save_every", config.save_every, length.epochs, "epochs", "checkpoints at the end of the run only"),
               ("--save_every_steps", config.save_every_steps, end, "steps", "no checkpoint between epoch ends"),
               ("--log_every", config.log_every, end, "steps", "metrics are logged at the end of each epoch only"),
               ("--vis_every", getattr(config, "vis_every", 0), length.epochs, "epochs", "a picture at the end only")]
    for flag, every, total, unit, effect in periods:
        if every > total:
            log.print(f"{flag} {every} is longer than this run's {total} {unit}: {effect}")


def _log_placement(log: RunLog, job: Job, state: TrainState, shardings: TrainState) -> None:
    """Where each parameter lives and how the optimizer treats it, once, in the output dir."""
    if not log.enabled:
        return
    placement = sharding.describe(jax.tree.map(lambda s: s.spec, shardings.params))
    groups = job.param_groups(state.params)
    lines = [f"{group}  {where.split('  ', 1)[1]}" for where, group in zip(placement, groups, strict=True)]
    (log.output_dir / "param_placement.txt").write_text("\n".join(lines) + "\n")
    log.print(f"{sum(x.size for x in jax.tree.leaves(state.params)):,} parameters; placement and optimizer groups "
              f"in {log.output_dir / 'param_placement.txt'}")
