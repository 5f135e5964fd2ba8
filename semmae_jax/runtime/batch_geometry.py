"""A batch's sizes at every scope, computed once from the flags and the devices.

The original's `--batch_size` is per device (global = batch_size x devices), so a command's
results change with the number of devices it runs on. `--global_batch_size` pins the global
batch instead: each device then holds `global / devices` images, and the same command gives
the same data order, lr and loss on 1, 2, 4 or 8 devices. Every job, evaluation and
extraction reads its sizes from one `BatchGeometry`, so the arithmetic (per device -> global ->
per process, and the effective batch of one optimizer update) is written here only.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    """Images per device, over all devices, per process, and per optimizer update.

    per_device: images one device holds in one step (one micro-batch).
    devices / processes: what the batch is split over.
    accum_iter: micro-batches per optimizer update (`--accum_iter`).
    """

    per_device: int
    devices: int
    processes: int
    accum_iter: int = 1

    @property
    def global_batch(self) -> int:
        """Images of one step over all devices (what the mesh's batch axes split)."""
        return self.per_device * self.devices

    @property
    def per_process(self) -> int:
        """This process's share of a step (what its input pipeline batches)."""
        return self.global_batch // self.processes

    @property
    def effective(self) -> int:
        """Images per optimizer update (the original's `eff_batch_size`: the lr scales with it)."""
        return self.global_batch * self.accum_iter

    def describe(self) -> str:
        """One line for the run's log."""
        return (f"global batch {self.global_batch} ({self.per_device} per device x {self.devices} devices) x accum_iter "
                f"{self.accum_iter} = effective batch {self.effective}")

    @classmethod
    def from_flags(cls, batch_size: int, global_batch_size: int | None = None, accum_iter: int = 1,
                   devices: int | None = None, processes: int | None = None,
                   flags: tuple[str, str] = ("--batch_size", "--global_batch_size")) -> BatchGeometry:
        """The geometry of `--batch_size` (per device) or, when given, `--global_batch_size`.

        Raises ValueError (one line naming the flag) for a global batch the devices do not divide.
        """
        devices = jax.device_count() if devices is None else devices
        processes = jax.process_count() if processes is None else processes
        per_device_flag, global_flag = flags
        if global_batch_size is None:
            if batch_size < 1:
                raise ValueError(f"{per_device_flag} must be at least 1, got {batch_size}")
            return cls(batch_size, devices, processes, accum_iter)
        if global_batch_size < devices or global_batch_size % devices:
            raise ValueError(f"{global_flag} {global_batch_size} does not split over the {devices} devices of this run: "
                             f"give a multiple of {devices}")
        return cls(global_batch_size // devices, devices, processes, accum_iter)
