"""What every benchmark shares: the jobs' own steps, built by the jobs' recipe, and one timer.

A benchmark that rebuilt the optimizer or the step by hand would time a step that merely
resembles the job's; here the job is built from its own flags (`pretrain.parse`,
`finetune.parse`) and its state, optimizer and jitted step come from the run skeleton's
`recipe` / `fresh_state` / `jitted_step`, as `python main.py pretrain` builds them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from semmae_jax import sharding
from semmae_jax.models import create_model
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.train.skeleton import Job, Recipe, build_recipe, fresh_state, jitted_step
from semmae_jax.train.state import TrainState, plan_state
from semmae_jax.train.steps import Step

# The run length a benchmark's recipe is built for: long enough that its steps are mid-run.
STEPS_PER_EPOCH = 1000


def pretrain_job(model: str, *flags: str) -> Job:
    """`main.py pretrain --model MODEL --input_size (the model's own) FLAGS...`."""
    from semmae_jax.jobs.pretrain import PretrainJob, parse

    return PretrainJob(parse(["--model", model, "--input_size", str(create_model(model).img_size), *flags]))


def finetune_job(model: str, *flags: str) -> Job:
    """`main.py finetune --model MODEL --input_size (the model's own) FLAGS...` (its defaults: layer
    decay, drop path, label smoothing)."""
    from semmae_jax.jobs.finetune import FinetuneJob, parse

    return FinetuneJob(parse(["--model", model, "--input_size", str(create_model(model).img_size), *flags]))


def job_step(job: Job, mesh: jax.sharding.Mesh, global_batch: int) -> tuple[TrainState, Step, Recipe]:
    """(fresh sharded state, jitted step, recipe) of `job` for `global_batch` on `mesh`, as its run starts."""
    built = build_recipe(job, job.build_model(), mesh_batch(job, mesh, global_batch), STEPS_PER_EPOCH, mesh)
    with jax.set_mesh(mesh):
        state, tx = fresh_state(job, built)
        return state, jitted_step(job, built, tx, built.shardings), built


def abstract_job_step(job: Job, mesh: jax.sharding.Mesh, global_batch: int) -> tuple[Any, Step, Recipe]:
    """(abstract state, jitted step, recipe): the same step for models too large to materialise here."""
    built = build_recipe(job, job.build_model(), mesh_batch(job, mesh, global_batch), STEPS_PER_EPOCH, mesh)
    with jax.set_mesh(mesh):
        plan = plan_state(built.model, built.make_tx, job.example_inputs(built), mesh, job.config.seed)
        return plan.abstract, jitted_step(job, built, plan.tx, plan.shardings), built


def mesh_batch(job: Job, mesh: jax.sharding.Mesh, global_batch: int) -> BatchGeometry:
    """`global_batch` split over `mesh`'s devices (the benchmarks' meshes may be a subset of the host's)."""
    return BatchGeometry.from_flags(0, global_batch, job.config.accum_iter, devices=mesh.size)


def abstract_batch(job: Job, model: Any, batch: Any, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch `job`'s step takes, as shapes placed on `mesh` (`batch` may be a symbolic size): images,
    and part labels (pretraining) or class labels (fine-tuning)."""
    placed = sharding.batch_sharding(mesh)
    images = jax.ShapeDtypeStruct((batch, *model.image_hw, model.in_chans), jnp.float32, sharding=placed)
    if job.name == "pretrain":
        return {"image": images, "part_labels": jax.ShapeDtypeStruct((batch, model.num_patches), jnp.int32,
                                                                     sharding=placed)}
    return {"image": images, "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=placed)}


def one_device_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh("data:1", devices=jax.devices()[:1])


@dataclasses.dataclass(frozen=True)
class Timing:
    warmup_s: float  # the untimed calls: compilation, allocation
    step_s: float  # seconds per timed call


def time_calls(call: Callable[[], Any], steps: int, *, warmup: int = 2,
               wait: Callable[[Any], Any] = jax.block_until_ready) -> Timing:
    """`warmup` calls, then `steps` calls dispatched back to back, each phase ended by `wait` on the
    last call's result, so that asynchronous work (JAX's dispatch, CUDA streams) is inside the time."""
    start, result = time.perf_counter(), None
    for _ in range(warmup):
        result = call()
    wait(result)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        result = call()
    wait(result)
    return Timing(warm, (time.perf_counter() - start) / steps)


def stepper(step: Step, state: TrainState, batch: dict[str, Any]) -> Callable[[], Any]:
    """A call that runs one step on `batch` and keeps the new state (what `time_calls` times)."""
    holder = {"state": state}

    def call() -> Any:
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    return call


def flags_of(values: dict[str, Any]) -> Sequence[str]:
    """{'dtype': 'bfloat16', 'norm_pix_loss': True} -> ['--dtype', 'bfloat16', '--norm_pix_loss']."""
    flags: list[str] = []
    for name, value in values.items():
        if value is True:
            flags.append(f"--{name}")
        elif value not in (False, None):
            flags += [f"--{name}", str(value)]
    return flags
