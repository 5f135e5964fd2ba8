"""The JAX measurements of `bench/gpu.py`, run inside its child processes.

Each function measures one row on JAX's first device and returns a dict of plain numbers.
The steps are the jobs' own, built from their flags by the jobs' recipe (`bench/common.py`:
`main.py pretrain` and `main.py finetune` with MAE's ViT-B fine-tuning recipe), on synthetic
inputs drawn on the device, so no input pipeline (and no TensorFlow) is involved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bench.common import finetune_job, job_step, one_device_mesh, pretrain_job, stepper, time_calls
from semmae_jax import sharding
from semmae_jax.train.skeleton import Job

# MAE's ViT-B fine-tuning recipe: what the step computes (erasing, mixup/cutmix, drop path) is the recipe's.
FINETUNE_FLAGS = ("--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--smoothing", "0.1", "--drop_path", "0.1",
                  "--layer_decay", "0.65", "--nb_classes", "1000")
FIT_MARGIN = 0.92  # use at most this share of the device's memory limit for XLA's estimate


class OutOfMemory(Exception):
    """The step ran out of device memory at `batch` while running (not at compile time)."""

    def __init__(self, batch: int) -> None:
        super().__init__(f"out of memory at batch {batch}")
        self.batch = batch


def is_oom(error: Exception) -> bool:
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def device_memory() -> dict[str, int] | None:
    """The allocator's statistics (GPU); None where the backend keeps none (CPU)."""
    return jax.devices()[0].memory_stats()


def compiled_bytes(compiled: Any) -> int | None:
    """XLA's estimate of the bytes one run needs: arguments + outputs + temporaries - donated
    (None where the backend gives no memory analysis)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def ceilings(matmul_size: int, copy_bytes: int, repeats: int) -> dict[str, float]:
    """The device's own ceilings: a square bf16 matmul (TFLOP/s) and a device copy (GB/s, read + write)."""
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (matmul_size, matmul_size), jnp.bfloat16) for k in keys)
    x = jnp.zeros((copy_bytes // 4,), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    copy = jax.jit(jnp.copy).lower(x).compile()
    matmul_s = time_calls(lambda: matmul(a, b), repeats).step_s
    copy_s = time_calls(lambda: copy(x), repeats).step_s
    return {"matmul_size": matmul_size, "matmul_tflops": 2 * matmul_size**3 / matmul_s / 1e12,
            "copy_bytes": copy_bytes, "copy_gbs": 2 * copy_bytes / copy_s / 1e9}


def synthetic_batch(kind: str, job: Job, model: Any, batch: int, mesh: Any) -> dict[str, jax.Array]:
    """Normalised-looking images and random part labels (or class labels), drawn on the device."""

    def draw(key: jax.Array) -> dict[str, jax.Array]:
        k1, k2 = jax.random.split(key)
        images = jax.random.normal(k1, (batch, *model.image_hw, model.in_chans), jnp.float32)
        if kind == "pretrain":
            labels = jax.random.randint(k2, (batch, model.num_patches), -1, job.config.num_parts - 1)
            return {"image": images, "part_labels": labels}
        return {"image": images, "label": jax.random.randint(k2, (batch,), 0, job.config.nb_classes)}

    return jax.jit(draw, out_shardings=sharding.batch_sharding(mesh))(jax.random.key(1))


def fit_batch(compile_at: Callable[[int], Any], max_batch: int, limit: int | None) -> tuple[int, Any, float, int]:
    """The largest batch <= `max_batch`, halving, whose compiled step fits `limit` bytes (XLA's
    estimate; an out-of-memory at compile time counts as not fitting).

    Above the limit, the next try skips the halvings that the estimate, linear in the batch
    beyond the arguments, already rules out. Returns (batch, compiled, compile seconds, tries).
    """
    batch, tries = max_batch, 0
    while batch >= 1:
        tries += 1
        start = time.perf_counter()
        try:
            compiled = compile_at(batch)
        except jax.errors.JaxRuntimeError as error:
            if not is_oom(error):
                raise
            batch //= 2
            continue
        seconds, need = time.perf_counter() - start, compiled_bytes(compiled)
        if limit is None or need is None or need <= limit:
            return batch, compiled, seconds, tries
        fixed = compiled.memory_analysis().argument_size_in_bytes
        smaller = batch // 2
        while smaller > 1 and fixed + (need - fixed) * smaller / batch > limit:
            smaller //= 2
        batch = smaller
    raise RuntimeError(f"not even a batch of 1 fits in {limit} bytes")


def train_step(kind: str, model_name: str, *, attention: str, setting: int, remat: bool, max_batch: int,
               warmup: int, steps: int) -> dict[str, Any]:
    """One pretraining or fine-tuning row: bf16 compute, fp32 params, the largest batch that fits."""
    flags = ["--dtype", "bfloat16", "--attention", attention, "--remat", "full" if remat else "none"]
    job = (pretrain_job(model_name, *flags, "--setting", str(setting)) if kind == "pretrain"
           else finetune_job(model_name, *flags, *FINETUNE_FLAGS))
    mesh = one_device_mesh()
    stats = device_memory()
    limit = int(stats["bytes_limit"] * FIT_MARGIN) if stats and "bytes_limit" in stats else None
    state, step, built = job_step(job, mesh, 1)
    model = built.model
    with jax.set_mesh(mesh):
        batches: dict[int, Any] = {}

        def compile_at(batch: int) -> Any:
            batches.clear()  # only the batch being tried stays on the device
            batches[batch] = synthetic_batch(kind, job, model, batch, mesh)
            return step.lower(state, batches[batch]).compile()

        batch, compiled, compile_s, tries = fit_batch(compile_at, max_batch, limit)
        data = batches[batch]
        try:
            seconds = time_calls(stepper(compiled, state, data), steps, warmup=warmup).step_s
        except jax.errors.JaxRuntimeError as error:
            if is_oom(error):
                raise OutOfMemory(batch) from error
            raise
    return {"batch": batch, "images_per_s": batch / seconds, "ms_per_step": seconds * 1e3, "compile_s": compile_s,
            "compile_tries": tries, **peak_memory(compiled)}


def peak_memory(compiled: Any) -> dict[str, Any]:
    """Peak device memory: the allocator's `peak_bytes_in_use` (one row per process, so it is this
    row's), or XLA's estimate for the step where the backend keeps no statistics (CPU)."""
    stats = device_memory()
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_gib": stats["peak_bytes_in_use"] / 2**30, "memory_source": "memory_stats peak_bytes_in_use"}
    need = compiled_bytes(compiled)
    return {"peak_gib": None if need is None else need / 2**30, "memory_source": "XLA memory_analysis (no memory_stats)"}


def describe_device() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "jax": jax.__version__,
            "device_count": jax.device_count()}
