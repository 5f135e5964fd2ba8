"""Orbax checkpoints: one layout and one resume order for every job, by concern.

* `manager`: a checkpoint root through orbax's public `CheckpointManager` (items, best by
  a metric, the preemption sync point), any `etils.epath` location;
* `integrity`: per-array checksums and the one-line `CheckpointDamaged`;
* `train_state`: the items of a `TrainState` checkpoint, saved and restored onto any mesh;
* `local`: frequent checkpoints on each host's own disk (`--local_save_every`), beside the persistent ones;
* `resume`: the resume order and the run's identity;
* `foreign`: the protocol through which the jobs read other frameworks' files.

A converted release holds `params` and `meta`; a training run's steps hold the training
state too. `load_params` reads the params of either, from the root, its run directory or one step.
"""

from semmae_jax.checkpoint.foreign import ResumeTarget, StatedModel, WeightsReader
from semmae_jax.checkpoint.manager import RunCheckpoints, load_params, open_step, save_params
from semmae_jax.checkpoint.resume import RunIdentity, restore_latest, resume
from semmae_jax.checkpoint.train_state import save_state

__all__ = [
    "ResumeTarget",
    "RunCheckpoints",
    "RunIdentity",
    "StatedModel",
    "WeightsReader",
    "load_params",
    "open_step",
    "restore_latest",
    "resume",
    "save_params",
    "save_state",
]
