"""Orbax checkpoints: one small module with one layout for every job.

A checkpoint is a directory of numbered steps (an orbax `CheckpointManager` root); each
step holds named items: `params` (always), and for training runs `opt_state`,
`train_state` (step, epoch, rng) and `config`; a converted release holds `params` and
`meta` (model name, source file). `load_params` therefore reads the params of a
converted `.pth`, of a pretraining run and of a fine-tuning run alike, from the root or
from one step directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS = "params"
META = "meta"


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.name), p) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_step_dir(path: str | Path) -> Path:
    """The step directory to read: `path` itself if it holds `params`, else its latest step."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected an orbax checkpoint directory)")
    if (path / PARAMS).is_dir():
        return path
    steps = [(step, p) for step, p in _step_dirs(path) if (p / PARAMS).is_dir()]
    if not steps:
        raise FileNotFoundError(f"{path} holds no checkpoint: no '{PARAMS}' item and no numbered step with one")
    return steps[-1][1]


def save_params(directory: str | Path, params: Any, meta: dict[str, Any] | None = None, step: int = 0) -> Path:
    """Write `params` (and a JSON `meta`) as step `step` of an orbax checkpoint root."""
    root = Path(directory).absolute()
    items = {PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(meta or {})}
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    return root / str(step)


def load_params(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Params as host numpy arrays (and the JSON meta, empty if none) from a checkpoint
    root or step directory, whatever devices or processes saved them.

    Callers place them on their own mesh (`jax.device_put` with their shardings).
    """
    step_dir = resolve_step_dir(path)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        tree = checkpointer.metadata(step_dir / PARAMS).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        params = checkpointer.restore(step_dir / PARAMS, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    meta_file = step_dir / META / "metadata"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return params, meta


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves (with shardings where the leaves have them)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class RunCheckpoints:
    """The checkpoints of one run: an orbax `CheckpointManager` over named items.

    Array items (params, optimizer state, step and rng) are saved sharded, every
    process writing its own shards, and committed once; JSON items (progress, config)
    by the primary process. Saving is asynchronous: the step loop goes on while the
    arrays are written, and `wait()` blocks until the last save is committed.
    Restoring takes abstract items whose shardings may differ from the saved ones (a
    checkpoint moves between meshes and process counts).
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, arrays: dict[str, Any], json_items: dict[str, dict[str, Any]]) -> None:
        items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        items.update({name: ocp.args.JsonSave(value) for name, value in json_items.items()})
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int, abstract_arrays: dict[str, Any], json_names: tuple[str, ...] = ()
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """(array items placed as `abstract_arrays` say, JSON items) of step `step`."""
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_arrays.items()}
        items.update({name: ocp.args.JsonRestore() for name in json_names})
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return {n: restored[n] for n in abstract_arrays}, {n: restored[n] for n in json_names}

    def item_names(self, step: int) -> list[str]:
        step_dir = self.directory / str(step)
        return sorted(p.name for p in step_dir.iterdir() if p.is_dir()) if step_dir.is_dir() else []

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
