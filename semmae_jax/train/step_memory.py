"""A step that cannot fit is refused before it runs, with XLA's own estimate and the levers.

Without this check a step too large for its device ends in a RESOURCE_EXHAUSTED traceback on a
GPU or TPU, and on a CPU host in the kernel's OOM kill, with no line at all, minutes later. The
compiled step's `memory_analysis()` (arguments + outputs - what they share + temporaries) is
what XLA will allocate for it on one device; it is held against the device's memory limit, or on
a CPU against the free host memory shared by this process's CPU devices.
"""

from __future__ import annotations

import jax

from semmae_jax.runtime.host_memory import available_host_bytes

GIB = 1024**3
LEVERS = ("lower --batch_size / --global_batch_size, recompute activations (--remat), --attention cudnn on NVIDIA GPUs, "
          "or shard the state over more devices (--mesh data:-1,fsdp:N)")


def step_bytes(compiled: jax.stages.Compiled) -> int | None:
    """What XLA allocates to run `compiled` once on one device; None where it does not say."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


def device_limit() -> tuple[int, str] | None:
    """(bytes one device may use, what that is), or None where neither the device nor the host says."""
    device = jax.local_devices()[0]
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"the {device.device_kind}'s memory"
    if device.platform == "cpu" and (free := available_host_bytes()) is not None:
        count = jax.local_device_count()
        shared = f" shared by {count} CPU devices" if count > 1 else ""
        return free // count, f"the free host memory{shared}"
    return None


def check_fits(compiled: jax.stages.Compiled, limit: tuple[int, str] | None = None) -> None:
    """Raise ValueError (one line: the estimate, the limit, the levers) if `compiled` cannot fit."""
    needed, limit = step_bytes(compiled), limit or device_limit()
    if needed is None or limit is None:
        return
    available, what = limit
    if needed > available:
        raise ValueError(f"the training step needs about {needed / GIB:.1f} GiB per device (XLA's estimate), more "
                         f"than {what} ({available / GIB:.1f} GiB per device): {LEVERS}")
