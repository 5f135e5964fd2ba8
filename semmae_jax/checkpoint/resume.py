"""The resume order, and which runs may continue which checkpoints.

A checkpoint of the run's own (the newest intact one among its persistent steps and, with
`--local_save_every`, the local steps every process holds: `local.py`) > `--resume`
(another run's directory: the whole state; anything a `WeightsReader` reads: its params,
and an original training `.pth`'s optimizer state too) > the fresh state. A run's own checkpoint is continued
only by a run of the same identity (`RunIdentity`): flags that make it another run are
refused rather than mixed into it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from semmae_jax.checkpoint.foreign import ResumeTarget, WeightsReader
from semmae_jax.checkpoint.integrity import CheckpointDamaged, reading
from semmae_jax.checkpoint.local import LocalCheckpoints
from semmae_jax.checkpoint.manager import RunCheckpoints
from semmae_jax.checkpoint.train_state import holds_training_state, restore_state
from semmae_jax.key_paths import flat_by_path
from semmae_jax.runtime.run_log import RunLog
from semmae_jax.runtime.storage import is_local, output_path


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """The config of the run that resumes, and which of its fields make it another run if changed."""

    config: dict[str, Any]
    defining: frozenset[str]
    allow_change: bool = False

    def check(self, saved: dict[str, Any] | None, where: Any, log: RunLog) -> None:
        """Refuse resuming a run with flags that change it (unless allowed); log the harmless changes."""
        if not saved:
            return
        changed = {k: (saved.get(k), v) for k, v in self.config.items() if k in saved and saved[k] != v}
        defining = {k: pair for k, pair in changed.items() if k in self.defining}
        for name, (old, new) in sorted(changed.items()):
            if name not in defining or self.allow_change:
                log.print(f"note: --{name} is {new!r}; the run in {where} was started with {old!r}")
        if defining and not self.allow_change:
            listed = ", ".join(f"--{k} {new!r} (saved {old!r})" for k, (old, new) in sorted(defining.items()))
            raise ValueError(f"{where} holds a run started with other settings: {listed}; use another --output_dir, "
                             "the saved flags, or --allow_config_change")


def resume(state: Any, run: RunCheckpoints, resume_from: str | None, reader: WeightsReader | None,
           target: ResumeTarget | None, log: RunLog, identity: RunIdentity | None = None,
           local: LocalCheckpoints | None = None) -> Any:
    """Continue this run, or start from `--resume`, or keep the fresh `state` (in that order).

    A damaged step of this run is reported in one line, set aside (`<step>.damaged`) and
    the previous one tried; with none readable left, starting over needs `--resume
    scratch`. With `target` None (jobs whose state is not a model's weights), `--resume`
    must be a run directory.
    """
    candidates = [(step, run) for step in run.all_steps()]
    candidates += [(step, local) for step in (local.common_steps() if local is not None else [])]
    if candidates:
        restored = _latest_readable(state, candidates, log, identity)
        if restored is not None:
            return restored
        if resume_from != "scratch":
            raise ValueError(f"no readable checkpoint is left in {run.directory} (damaged steps set aside as "
                             "*.damaged); rerun with --resume scratch to start this run over")
    if not resume_from or resume_from in ("auto", "scratch"):
        return state
    other = _another_run(resume_from)
    if other is not None:
        log.print(f"resuming from {resume_from} (step {other.latest_step()}: params, optimizer state and position)")
        return _restore_latest_of(other, state)
    if reader is None or target is None:
        raise ValueError(f"--resume {resume_from}: not a run checkpoint directory")
    params = reader.params_for_model(resume_from, target.model_name, target.img_size)
    _check_fits(params, state.params, resume_from)
    state = state.replace(params=jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params)))
    continued = reader.continue_optimizer(state, resume_from, target, log) if target.betas else None
    if continued is None:
        log.print(f"starting from the params of {resume_from} (fresh optimizer state, step 0)")
        return state
    return continued


def restore_latest(directory: str, like: Any) -> Any:
    """The latest training state of the run whose checkpoints are at `directory` (or under its
    `checkpoints/`), restored into the shardings of `like`: what `--eval` scores of a run."""
    run = _another_run(directory) or _another_run(f"{str(directory).rstrip('/')}/checkpoints")
    if run is None:
        raise ValueError(f"{directory}: no training checkpoint of a run to evaluate (a run directory or its checkpoints)")
    return _restore_latest_of(run, like)


def _restore_latest_of(run: RunCheckpoints, like: Any) -> Any:
    """`run`'s latest step restored into the shardings of `like`; `run` closed on every way out."""
    try:
        return restore_state(run, run.latest_step(), like)
    finally:
        run.close()


def _another_run(path: str) -> RunCheckpoints | None:
    """The checkpoints of another run's directory holding a training state, or None (a weights file, ...)."""
    if is_local(path) and not output_path(path, "--resume").is_dir():
        return None
    checkpoints = RunCheckpoints(path, async_save=False, create=False)
    if holds_training_state(checkpoints):
        return checkpoints
    checkpoints.close()
    return None


def _check_fits(params: Any, model_params: Any, source: str) -> None:
    """Refuse, naming the parameters, weights whose tree is not the model's (a checkpoint of the
    same model name with other fields, e.g. transformers' `qkv_bias: false`)."""
    have, want = set(flat_by_path(params)), set(flat_by_path(model_params))
    if have != want:
        missing, unexpected = sorted(want - have), sorted(have - want)
        raise ValueError(f"--resume {source}: its params do not fit the model of the flags (missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''})")


def _latest_readable(state: Any, candidates: list[tuple[int, RunCheckpoints]], log: RunLog,
                     identity: RunIdentity | None) -> Any | None:
    """This run's newest (step, checkpoints) that reads back intact (older ones tried in turn; of a
    persistent and a local step of the same number, the persistent one first), or None."""
    for step, run in sorted(candidates, key=lambda c: (c[0], not c[1].host_local), reverse=True):
        try:
            if identity is not None:
                with reading(f"step {step}"):
                    saved_config = run.json_item(step, "config")
                identity.check(saved_config, run.directory, log)  # other flags: the user's change, not damage
            restored = restore_state(run, step, state)
        except CheckpointDamaged as error:
            moved = run.set_aside(step)
            log.print(f"checkpoint {error} in {run.directory}: damaged, moved to {moved.name}; trying the previous one")
            continue
        log.print(f"resuming this run from its checkpoint at step {step} in {run.directory}")
        return restored
    return None
