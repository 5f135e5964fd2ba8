"""Start-up of JAX's own multi-process runtime (`jax.distributed`).

Three ways in, tried in this order:
1. explicit flags, with jax.distributed's own names: `--coordinator_address HOST:PORT
   --num_processes N --process_id I`;
2. the environment, where JAX detects the cluster itself (SLURM with more than one
   task, Open MPI's `mpirun`, TPU pod slices, Kubernetes jobs);
3. otherwise a single process.

CPU runs use gloo collectives (the only cross-process CPU backend). A peer that dies is
noticed by the coordination service's heartbeat: the survivors stop with an error
after `heartbeat_timeout_seconds` instead of waiting forever in a collective.

On a GPU, start-up also adds the project's default XLA flags (`GPU_XLA_FLAGS`) to
`XLA_FLAGS`: XLA reads that variable once, when the backend starts, so this is the one
moment they can be set. A flag that `XLA_FLAGS` already names keeps the user's value.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping

import jax

# The XLA flags every job sets on a GPU (NVIDIA's JAX image sets the same): the latency-hiding
# scheduler overlaps collectives (and async copies) with compute. `bench/gpu.py` measures a
# step with and without them. Override any of them with XLA_FLAGS, e.g.
# XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false.
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
_CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")

# Environment variables whose presence means "launched as one of several processes".
_CLUSTER_HINTS = {
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
    "MEGASCALE_COORDINATOR_ADDRESS": bool,
}


def with_gpu_xla_flags(xla_flags: str, defaults: tuple[str, ...] = GPU_XLA_FLAGS) -> str:
    """`xla_flags` plus every default whose flag it does not set already (the given value wins)."""
    given = xla_flags.split()
    names = {flag.split("=")[0] for flag in given}
    return " ".join(given + [flag for flag in defaults if flag.split("=")[0] not in names])


def gpu_expected(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether JAX will start on an NVIDIA GPU: a CUDA plugin is installed and neither
    `JAX_PLATFORMS` nor an empty `CUDA_VISIBLE_DEVICES` rules it out. Answered without
    starting the backend, which would read XLA_FLAGS too early."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and not {"cuda", "gpu"} & set(platforms.lower().split(",")):
        return False
    if environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(importlib.util.find_spec(name) is not None for name in _CUDA_PLUGINS)


def apply_gpu_xla_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Add `GPU_XLA_FLAGS` to `XLA_FLAGS` when JAX will start on a GPU; returns the flags added.

    Call before anything touches a JAX device; afterwards XLA_FLAGS is no longer read.
    """
    if not gpu_expected(environ):
        return []
    old = environ.get("XLA_FLAGS", "")
    environ["XLA_FLAGS"] = with_gpu_xla_flags(old)
    return environ["XLA_FLAGS"].split()[len(old.split()):]


def _cluster_detected() -> bool:
    return any(name in os.environ and check(os.environ[name]) for name, check in _CLUSTER_HINTS.items())


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = 100,
    initialization_timeout: int = 300,
) -> bool:
    """Join the job's processes if there are several; True when running multi-process.

    Call before anything touches a JAX device (it also sets the GPU's default XLA flags,
    `apply_gpu_xla_flags`). Safe to call twice.
    """
    apply_gpu_xla_flags()
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("give all three of --coordinator_address, --num_processes and --process_id, or none")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if all(v is not None for v in explicit) and num_processes == 1:
        return False
    if not (all(v is not None for v in explicit) or _cluster_detected()):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
    return True


def is_primary() -> bool:
    """Process 0 prints progress and writes logs, TensorBoard and pictures."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here for the others (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
