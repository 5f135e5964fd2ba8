"""The two sides of `parity --train`: N optimizer updates of a job's recipe in JAX, as the job
builds it (`semmae_jax.train.skeleton.recipe`, the job's own step), and in the PyTorch reference
(`convert.parity.torch_training`), from the same weights over the same batches.

Both sides end with their parameters in the original's `.pth` layout (torch keys), where
they are compared group by group.
"""

from __future__ import annotations

# timm and transformers load triton, which crashes the process when loaded after TensorFlow.
from convert.parity import torch_training  # isort: skip

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from convert.arch import infer_architecture
from convert.core import flax_to_torch
from convert.hf_files import read_hf
from convert.parity.references import reference_from_params
from convert.safe_load import tensor_to_numpy
from semmae_jax import masking, sharding
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.train.skeleton import Job, build_recipe, fresh_state, jitted_step
from semmae_jax.train.state import create_state, merge_pretrained
from semmae_jax.train.steps import NOISE_STREAM, alpha_at

Batch = dict[str, np.ndarray]


@dataclass
class Trajectory:
    """One side's run: per update the mean loss of its micro-batches and the lr; the final weights."""

    losses: list[float]
    lrs: list[float]
    params: dict[str, np.ndarray]  # torch key -> array


@dataclass
class Start:
    """What both sides start from: the job's trainable params and, for the probe, the frozen encoder."""

    params: Any  # None until the first JAX run has initialised them (the job's own initialisation)
    encoder: Any = None


@dataclass
class Setup:
    """One comparison: the job (its config), where JAX runs, the start, the batches and the schedule."""

    job: Job
    mesh: jax.sharding.Mesh
    batch: BatchGeometry
    start: Start
    batches: list[Batch]  # micro-batches; pretraining's gain their "noise" from the first JAX run
    steps_per_epoch: int
    lr: float  # the peak lr (the original's `args.lr`)


def steps_per_epoch(config: Any, updates: int) -> int:
    """`--steps_per_epoch`, or the length that makes the N updates span the whole schedule
    (`--epochs`); a multiple of `--accum_iter`, so that no update straddles two epochs."""
    accum = config.accum_iter
    steps = config.steps_per_epoch or math.ceil(updates * accum / config.epochs)
    return math.ceil(steps / accum) * accum


def make_batches(job: Job, count: int, global_batch: int, seed: int) -> list[Batch]:
    """`count` micro-batches of normal random images (and labels or part labels), seeded."""
    c, rng = job.config, np.random.default_rng(seed)
    size = c.input_size
    batches = []
    for _ in range(count):
        batch = {"image": rng.standard_normal((global_batch, size, size, 3), dtype=np.float32)}
        if job.name == "pretrain":
            patches = (size // job.build_model().patch_size) ** 2
            batch["part_labels"] = rng.integers(0, c.num_parts, (global_batch, patches), dtype=np.int32)
        else:
            batch["label"] = rng.integers(0, c.nb_classes, global_batch, dtype=np.int32)
        batches.append(batch)
    return batches


def initial(job: Job, mesh: jax.sharding.Mesh, batch: BatchGeometry, source: Any = None) -> tuple[Start, list[str]]:
    """What both sides start from: the job's own initialisation (seed `--seed`, made by the first
    JAX run), with `source` params (a checkpoint) where path and shape fit; the probe's encoder
    (initialised, or the checkpoint's). Returns (start, notes on what the checkpoint did not give)."""
    if job.name == "linprobe":
        size = job.encoder.img_size
        model, example = job.encoder, (jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),)
    elif source is None:
        return Start(None), []
    else:
        built = build_recipe(job, job.build_model(), batch, 1, mesh)
        with jax.set_mesh(mesh):
            state, _ = fresh_state(job, built)
            params, notes = _merged(state.params, source)
        return Start(params), notes
    with jax.set_mesh(mesh):
        state, _, _ = create_state(model, lambda p: optax.identity(), example, mesh, job.config.seed)
        params, notes = _merged(state.params, source)
    return Start(None, params), notes


def _merged(target: Any, source: Any) -> tuple[Any, list[str]]:
    if source is None:
        return jax.device_get(target), []
    params, missing, unused = merge_pretrained(target, source)
    notes = [f"not in the checkpoint (initialised): {', '.join(missing)}"] if missing else []
    notes += [f"in the checkpoint, unused: {', '.join(unused)}"] if unused else []
    return jax.device_get(params), notes


def jax_trajectory(setup: Setup, job: Job | None = None, mesh: jax.sharding.Mesh | None = None) -> Trajectory:
    """The job's recipe and jitted step over the setup's micro-batches (`job`, `mesh`: another
    config or device set than the setup's). Pretraining batches without "noise" gain the masking
    noise each step drew (the step's own draw, repeated outside it) for the PyTorch side."""
    job, mesh = job or setup.job, mesh or setup.mesh
    c, start = job.config, setup.start
    built = build_recipe(job, job.build_model(), setup.batch, setup.steps_per_epoch, mesh)
    micro_losses = []
    with jax.set_mesh(mesh):
        state, tx = fresh_state(job, built, init_params=start.params)
        if start.params is None:
            start.params = jax.device_get(state.params)
        if start.encoder is not None:
            state = state.replace(frozen=jax.device_put(start.encoder, sharding.replicated(mesh)))
            built.shardings = jax.tree.map(lambda x: x.sharding, state)
        step = jitted_step(job, built, tx, built.shardings)
        for batch in setup.batches:
            if job.name == "pretrain" and "noise" not in batch:
                alpha = alpha_at(state.step, c.setting, built.length.total_steps, c.gamma)
                batch["noise"] = np.array(masking.masking_noise(
                    state.step_key(NOISE_STREAM), jnp.asarray(batch["part_labels"]), setting=c.setting,
                    mask_ratio=c.mask_ratio, alpha=alpha, num_parts=c.num_parts))
            state, metrics = step(state, {k: v for k, v in batch.items() if k != "noise"})
            micro_losses.append(float(metrics["loss"]))
        params = jax.device_get(state.params)
    accum = c.accum_iter
    losses = [float(np.mean(micro_losses[i:i + accum])) for i in range(0, len(micro_losses), accum)]
    lrs = [float(built.length.lr_schedule()(update)) for update in range(len(losses))]
    return Trajectory(losses, lrs, jax_layout(job, params))


def jax_layout(job: Job, params: Any) -> dict[str, np.ndarray]:
    """JAX params under the original's torch keys (the probe: its head, `head.1` as in `main_linprobe.py`)."""
    if job.name == "linprobe":
        return {"head.1.weight": np.asarray(params["head"]["kernel"]).T, "head.1.bias": np.asarray(params["head"]["bias"])}
    return dict(flax_to_torch(params, job.config.model))


def torch_trajectory(setup: Setup) -> Trajectory:
    """The PyTorch reference of the job's training from the setup's start over its batches (pretraining:
    with the noise the JAX run drew)."""
    job, start = setup.job, setup.start
    c = job.config
    args = dataclasses.replace(c, lr=setup.lr)
    weights = start.encoder if start.encoder is not None else start.params
    arch = infer_architecture({k: v.shape for k, v in flax_to_torch(weights, c.model).items()}, c.model)
    with tempfile.TemporaryDirectory() as scratch:
        model, hf_class = reference_from_params(weights, arch, scratch)
        if job.name == "pretrain":
            model.config.mask_ratio, model.config.norm_pix_loss = c.mask_ratio, c.norm_pix_loss
            training = torch_training.pretrain(model, args)
        elif job.name == "finetune":
            training = torch_training.finetune(model, args)
        else:
            training = torch_training.linprobe(model, _torch_head(start.params["head"]), args)
        losses, lrs = zip(*torch_training.train(training, setup.batches, setup.steps_per_epoch), strict=True)
        if hf_class is None:
            params = {k: tensor_to_numpy(v.detach()) for k, v in training.model.named_parameters()}
        else:  # transformers' own names -> its hub layout -> the original's keys
            model.save_pretrained(f"{scratch}/trained")
            params = dict(read_hf(f"{scratch}/trained").state_dict)
    return Trajectory(list(losses), list(lrs), params)


def _torch_head(head: Any) -> torch.nn.Linear:
    kernel = np.asarray(head["kernel"])
    linear = torch.nn.Linear(*kernel.shape)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
        linear.bias.copy_(torch.from_numpy(np.array(head["bias"])))
    return linear
