"""Local checkpoints: frequent saves on each host's own disk, beside the persistent ones.

A persistent checkpoint (`--save_every` epochs, `--save_every_steps`) is written
cooperatively to the run's shared directory: every process writes its shards, one
commit. When a host dies, whatever was trained since then is lost. A local checkpoint
(`--local_save_every` steps) is cheap: every process writes the shards it holds (replicas
included) to a directory of its own disk, with no barrier and no commit shared with the
other processes (orbax's `CheckpointManager` with the multiprocessing settings of its
emergency local checkpoints, `orbax.checkpoint.experimental.emergency`: primary_host None,
each process alone). Its restore reads each process's shards back from its own directory,
so it fits only the same processes and mesh: the directory is named by them
(`<root>/<processes>x<devices>_<mesh>/process_<i>`), and another layout simply finds none.

orbax's emergency `CheckpointManager` itself is not used: with one replica slice (every
run that is not multi-slice TPU) it keeps no local checkpoints at all, and it saves one
`state` item where a run saves several (`checkpoint/train_state.py`).

Resuming (`resume.resume`) takes the newest step that reads back intact among the run's
persistent steps and the local steps every process holds (`common_steps`: a host that died
mid-save, or a new machine with an empty disk, has not got the newest one).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from semmae_jax.checkpoint.manager import RunCheckpoints

LOCAL_KEPT = 2  # the newest local step may be half written when a host dies: the one before it stays


def local_root(root: epath.Path, mesh: jax.sharding.Mesh) -> epath.Path:
    """This process's own directory under `root`, named by the process layout and mesh its shards fit."""
    layout = "_".join(f"{axis}{size}" for axis, size in mesh.shape.items())
    return root / f"{jax.process_count()}x{jax.local_device_count()}_{layout}" / f"process_{jax.process_index()}"


class LocalCheckpoints(RunCheckpoints):
    """This process's local checkpoints, saved every `every` steps (see the module's docstring)."""

    def __init__(self, root: epath.Path, every: int, mesh: jax.sharding.Mesh) -> None:
        directory = local_root(root, mesh)
        directory.mkdir(parents=True, exist_ok=True)  # orbax creates no root for a process on its own
        super().__init__(directory, max_to_keep=LOCAL_KEPT, host_local=True, create=False)
        self.every = every

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, arrays: dict[str, Any], json_items: dict[str, dict[str, Any]],
             metrics: dict[str, float] | None = None) -> None:
        """Save `step`, replacing a step of that number that this process alone kept (a run resumed from
        an older step, because another process had not got this one, passes it again)."""
        if step in self.all_steps():
            self._manager.delete(step)
        super().save(step, arrays, json_items, metrics)

    def common_steps(self) -> list[int]:
        """The steps every process holds (a collective: every process calls it at the same point)."""
        mine = self.all_steps()
        if jax.process_count() == 1:
            return mine
        width = int(multihost_utils.process_allgather(np.int32(len(mine))).max())
        padded = np.full(max(width, 1), -1, np.int32)
        padded[: len(mine)] = mine
        held = multihost_utils.process_allgather(padded)
        return sorted(set.intersection(*(set(row[row >= 0].tolist()) for row in held)))
