"""The training-state layout: which items a `TrainState` checkpoint holds, and how it is
saved and read back, verified and placed on any mesh."""

from __future__ import annotations

from typing import Any

import jax

from semmae_jax.checkpoint.integrity import checksums, reading, verify
from semmae_jax.checkpoint.manager import RunCheckpoints
from semmae_jax.key_paths import flat_by_path


def state_items(state: Any) -> dict[str, Any]:
    """The array items of a `TrainState` checkpoint (the rng as raw key data: orbax stores plain arrays)."""
    return _items(state, jax.random.key_data(state.rng))


def abstract_items(shapes: Any) -> dict[str, Any]:
    """`state_items` of an abstract state whose leaves carry the target shardings (they decide placement)."""
    key_data = jax.eval_shape(jax.random.key_data, shapes.rng)
    return _items(shapes, jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=shapes.step.sharding))


def _items(state: Any, rng_data: Any) -> dict[str, Any]:
    items = {"params": state.params, "opt_state": state.opt_state, "train_state": {"step": state.step, "rng": rng_data}}
    return {**items, "model_state": state.model_state} if state.model_state else items


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves (with shardings where the leaves have them)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def save_state(checkpoints: RunCheckpoints, state: Any, steps_per_epoch: int, config: dict[str, Any],
               epoch_stats: dict[str, Any] | None = None) -> None:
    """Checkpoint `state` with where the run is, its config, the per-array checksums and the
    running sums of an unfinished epoch (so a resumed epoch reports whole-epoch figures)."""
    step = int(state.step)
    progress = {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch}
    items = state_items(state)
    json_items = {"progress": progress, "config": config, "checksums": checksums(items)}
    checkpoints.save(step, items, {**json_items, "epoch_stats": epoch_stats} if epoch_stats else json_items)


def restore_state(checkpoints: RunCheckpoints, step: int, like: Any) -> Any:
    """The state saved at `step`, restored straight into the shardings of `like` (any mesh, any process count).

    Raises `CheckpointDamaged` (one line) when the step cannot be read or does not match
    the checksums written with it; a state of other shapes (another model) is a ValueError.
    """
    target = abstract_items(abstract_like(like))
    _check_saved_shapes(checkpoints, step, target)
    with reading(f"step {step}"):
        arrays = checkpoints.restore(step, target)
        saved_checksums = checkpoints.json_item(step, "checksums")
    verify(step, arrays, saved_checksums)
    train = arrays["train_state"]
    return like.replace(step=train["step"], params=arrays["params"], opt_state=arrays["opt_state"],
                        rng=jax.random.wrap_key_data(train["rng"]), model_state=arrays.get("model_state", {}))


def _check_saved_shapes(checkpoints: RunCheckpoints, step: int, target: dict[str, Any]) -> None:
    """A saved state of other shapes is the user's change (another model), not damage: say so, touch nothing."""
    with reading(f"step {step}"):
        saved = checkpoints.item_shapes(step, target)
    for name, tree in target.items():
        for path, leaf in flat_by_path(tree).items():
            shape = saved[name].get(path)
            if shape is not None and shape != tuple(leaf.shape):
                raise ValueError(f"{checkpoints.directory}/{step} holds {name}/{path} of shape {shape}, this run's "
                                 f"model {tuple(leaf.shape)}: the checkpoint is of another model (--model, --input_size, --in_chans?)")


def holds_training_state(checkpoints: RunCheckpoints) -> bool:
    """Is the latest step of `checkpoints` a training state (has an optimizer state)?"""
    latest = checkpoints.latest_step()
    return latest is not None and "opt_state" in checkpoints.item_names(latest)
