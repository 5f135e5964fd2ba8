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


def load_params(path: str | Path, abstract_params: Any = None) -> tuple[Any, dict[str, Any]]:
    """Params (and the JSON meta, empty if none) from a checkpoint root or step directory.

    `abstract_params` (a tree of `jax.ShapeDtypeStruct`, with shardings when restoring
    onto a mesh) checks the stored shapes and places the arrays; without it the arrays
    come back as saved, on the default device.
    """
    step_dir = resolve_step_dir(path)
    handler = ocp.StandardCheckpointHandler()
    with ocp.Checkpointer(handler) as checkpointer:
        args = ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()
        params = checkpointer.restore(step_dir / PARAMS, args=args)
    meta_file = step_dir / META / "metadata"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return params, meta


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves (with shardings where the leaves have them)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
