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
"""

from __future__ import annotations

import os

import jax

# Environment variables whose presence means "launched as one of several processes".
_CLUSTER_HINTS = {
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
    "MEGASCALE_COORDINATOR_ADDRESS": bool,
}


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

    Call before anything touches a JAX device. Safe to call twice.
    """
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
