"""The checkpoints of a run, through orbax's public `CheckpointManager` only.

A checkpoint root holds numbered steps; each step holds named items. Array items
(`ARRAY_ITEMS`: params, optimizer state, step and rng, model state) are saved sharded,
every process writing its own shards, committed once; JSON items (`JSON_ITEMS`: where the
run is, its config, the checksums, a converted release's `meta`) by the primary process.
A handler is registered for every item name, so the manager itself answers which items a
step has and of what shapes (`item_shapes`) and reads any one of them: nothing here
reads orbax's files or lists its directories by hand.

The root may be any `etils.epath` location (`gs://bucket/run/checkpoints`): orbax writes
there itself. The free-space check before a save is made only on a local disk.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from semmae_jax.checkpoint.integrity import failure_reason, reading
from semmae_jax.key_paths import flat_by_path
from semmae_jax.runtime.distributed import is_primary, sync
from semmae_jax.runtime.storage import PathLike, is_local, output_path

PARAMS = "params"
META = "meta"
ARRAY_ITEMS = (PARAMS, "opt_state", "train_state", "model_state")
JSON_ITEMS = (META, "progress", "config", "checksums", "epoch_stats")
RUN_CHECKPOINTS = "checkpoints"  # a run directory's checkpoint root: `<output_dir>/checkpoints`
_ITEM_NAMES = frozenset(ARRAY_ITEMS + JSON_ITEMS)
_NAME_FORMAT = ocp.step.standard_name_format()  # steps named by their number: `<root>/<step>`


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions, ...): one line, the run stops."""


def _handlers(host_local: bool = False) -> dict[str, ocp.CheckpointHandler]:
    if not host_local:
        arrays = {name: ocp.PyTreeCheckpointHandler() for name in ARRAY_ITEMS}
        return {**arrays, **{name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS}}
    alone = _alone()
    registry = ocp.type_handlers.create_type_handler_registry(  # every shard this process holds, replicas too
        (jax.Array, ocp.type_handlers.ArrayHandler(primary_host=None, replica_id=None, use_replica_parallel=False)))
    arrays = {name: ocp.PyTreeCheckpointHandler(multiprocessing_options=alone, type_handler_registry=registry)
              for name in ARRAY_ITEMS}
    return {**arrays, **{name: ocp.JsonCheckpointHandler(multiprocessing_options=alone) for name in JSON_ITEMS}}


def _alone() -> ocp.options.MultiprocessingOptions:
    """This process as its own primary and only participant: no barrier with any other process
    (the settings of orbax's emergency local checkpoints, `experimental.emergency`)."""
    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=None, active_processes={me},
                                              barrier_sync_key_prefix=f"host_local_{me}")


class RunCheckpoints:
    """One checkpoint root: save, restore and inspect steps, keep the best by a metric.

    Saving is asynchronous: the step loop goes on while the arrays are written, and
    `wait()` blocks until the last save is committed. Restoring takes abstract items whose
    shardings may differ from the saved ones (a checkpoint moves between meshes and process
    counts). With `best_metric`, orbax keeps the step whose saved metric is highest (and
    `max_to_keep` of them): the metric is stored with the step, so the best survives resumes.
    """

    def __init__(self, directory: PathLike, *, max_to_keep: int | None = 3, async_save: bool = True,
                 best_metric: str | None = None, create: bool = True, host_local: bool = False) -> None:
        self.directory = output_path(directory, "checkpoint directory")
        self.host_local = host_local  # this process's own root: it writes and reads its shards alone
        best = {"best_fn": lambda metrics: metrics[best_metric], "best_mode": "max",
                "keep_checkpoints_without_metrics": False} if best_metric else {}
        # per-process directory creation: orbax's signals that a step's directories exist are then this process's own
        alone = {"multiprocessing_options": _alone(), "enable_per_process_directory_creation": True} if host_local else {}
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=async_save, step_name_format=_NAME_FORMAT,
                                               **best, **alone)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers(host_local))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def committed_step(self) -> int | None:
        """The newest step whose save has completed (`latest_step` counts one still being written)."""
        steps = self.all_steps()
        if steps and self._manager.is_saving_in_progress():
            steps.remove(max(steps))
        return max(steps, default=None)

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with `step` (None if it has none)."""
        return self._manager.metrics(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any process got a preemption notice
        (JAX's coordination service; always False in a single process)."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, arrays: dict[str, Any], json_items: dict[str, dict[str, Any]],
             metrics: dict[str, float] | None = None) -> None:
        """Start writing step `step` (asynchronously); a full disk or any I/O error is one clear line."""
        if is_local(self.directory):
            self._check_space(step, sum(x.nbytes for x in jax.tree.leaves(arrays)) // jax.process_count())
        items = {name: ocp.args.PyTreeSave(tree) for name, tree in arrays.items()}
        items.update({name: ocp.args.JsonSave(value) for name, value in json_items.items()})
        with self._write_errors(f"checkpoint step {step}"):
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def _check_space(self, step: int, needed: int) -> None:
        free = shutil.disk_usage(self.directory).free
        if free < needed * 1.1:
            raise CheckpointWriteError(f"cannot write checkpoint step {step} in {self.directory}: {free / 2**20:.0f} MiB "
                                       f"free, about {needed / 2**20:.0f} MiB needed (disk full?); earlier steps are "
                                       "intact: free space and rerun the same command to resume")

    @contextlib.contextmanager
    def _write_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointWriteError(f"could not write {what} in {self.directory}: {failure_reason(error)}; earlier "
                                       "steps are intact: fix the cause and rerun the same command to resume") from error

    def restore(self, step: int, abstract_arrays: dict[str, Any]) -> dict[str, Any]:
        """The array items of step `step`, placed as `abstract_arrays` say."""
        items = {name: ocp.args.PyTreeRestore(tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))
                 for name, tree in abstract_arrays.items()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return {name: restored[name] for name in abstract_arrays}

    def host_arrays(self, step: int, name: str) -> Any:
        """One array item of `step` as host numpy arrays, whatever devices or processes saved it."""
        return StepReader(self.step_path(step)).host_arrays(name)

    def json_item(self, step: int, name: str) -> dict[str, Any] | None:
        """A JSON item of step `step` (None if that step has none)."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]
        except KeyError:  # orbax: the item "was not found in the checkpoint"
            return None

    def item_names(self, step: int) -> set[str]:
        """The items `step` holds (`CheckpointDamaged` where its metadata cannot be read)."""
        with _reading_metadata(self.step_path(step)):
            return set(self._manager.item_metadata(step)) & _ITEM_NAMES

    def item_shapes(self, step: int, names: Iterable[str]) -> dict[str, dict[str, tuple[int, ...]]]:
        """{item: {'blocks_0/attn/qkv/kernel': shape, ...}} of array items of `step`, from one read of its metadata."""
        metadata = self._manager.item_metadata(step)
        return {name: _shapes(metadata[name]) for name in names}

    def step_path(self, step: int) -> epath.Path:
        return ocp.step.build_step_path(self.directory, _NAME_FORMAT, step)

    def set_aside(self, step: int, why: str = "damaged") -> epath.Path:
        """Rename a step to `<step>.<why>` (kept for inspection; no step name to orbax, so invisible to resume)."""
        source = self.step_path(step)
        target = source.parent / f"{source.name}.{why}"
        if self.host_local or is_primary():
            source.rename(target)
        sync(f"set_aside_{step}")
        self._manager.reload()
        return target

    def wait(self) -> None:
        with self._write_errors("a checkpoint"):
            self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _reading_metadata(step_path: epath.Path) -> contextlib.AbstractContextManager[None]:
    return reading(f"checkpoint {step_path} is damaged: its metadata cannot be read")


def _shapes(metadata: Any) -> dict[str, tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in flat_by_path(metadata.tree).items()
            if getattr(leaf, "shape", None) is not None}


class StepReader:
    """One step directory read on its own (orbax's `Checkpointer` over the same item handlers):
    a step of any root, also one set aside as `<step>.damaged` for inspection. A step whose
    files cannot be read is `CheckpointDamaged`, in one line naming the directory."""

    def __init__(self, directory: PathLike) -> None:
        self.directory = output_path(directory, "checkpoint step")
        handler = ocp.CompositeCheckpointHandler(**_handlers())
        with _reading_metadata(self.directory), ocp.Checkpointer(handler) as checkpointer:
            self._items = dict(checkpointer.metadata(self.directory).item_metadata)

    def item_names(self) -> set[str]:
        return set(self._items) & _ITEM_NAMES

    def host_arrays(self, name: str) -> Any:
        """One array item as host numpy arrays, whatever devices or processes saved it."""
        with self._reading(name):
            metadata = self._items[name]
            if metadata is None:
                raise ValueError("orbax finds no metadata of it")
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
            return self._restore(name, ocp.args.PyTreeRestore(restore_args=restore_args))

    def params_and_meta(self) -> tuple[Any, dict[str, Any]]:
        """The params as host numpy arrays and the JSON meta (empty if none): `load_params`."""
        return self.host_arrays(PARAMS), self.json_item(META) or {}

    def json_item(self, name: str) -> dict[str, Any] | None:
        if name not in self._items:
            return None
        with self._reading(name):
            return self._restore(name, ocp.args.JsonRestore())

    def _reading(self, name: str) -> contextlib.AbstractContextManager[None]:
        return reading(f"checkpoint {self.directory} is damaged: its item '{name}' cannot be read")

    def _restore(self, name: str, args: ocp.args.CheckpointArgs) -> Any:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers())) as checkpointer:
            return checkpointer.restore(self.directory, args=ocp.args.Composite(**{name: args}))[name]


def save_params(directory: PathLike, params: Any, meta: dict[str, Any] | None = None, step: int = 0) -> epath.Path:
    """Write `params` (and a JSON `meta`) as step `step` of a checkpoint root; returns the step's path."""
    checkpoints = RunCheckpoints(directory, max_to_keep=None, async_save=False)
    checkpoints.save(step, {PARAMS: params}, {META: meta or {}})
    checkpoints.wait()
    checkpoints.close()
    return checkpoints.step_path(step)


def open_step(path: PathLike) -> StepReader:
    """The step that `path` names: the latest step with params of a checkpoint root or of a run
    directory (its `checkpoints/`, `RUN_CHECKPOINTS`), or one step directory."""
    location = output_path(path, "checkpoint")
    if not location.is_dir():
        raise FileNotFoundError(f"checkpoint {location} does not exist (expected an orbax checkpoint directory)")
    for root in (location, location / RUN_CHECKPOINTS):
        step = _latest_with_params(root)
        if step is not None:
            return step
    step = StepReader(location)
    if PARAMS not in step.item_names():
        raise FileNotFoundError(f"{location} holds no checkpoint: no '{PARAMS}' item and no numbered step with one, "
                                f"neither in it nor in its {RUN_CHECKPOINTS}/")
    return step


def _latest_with_params(root: epath.Path) -> StepReader | None:
    """The latest step of `root` that holds params; a damaged one is an error, not skipped for an older one."""
    if not root.is_dir():
        return None
    checkpoints = RunCheckpoints(root, async_save=False, create=False)
    step_paths = [checkpoints.step_path(step) for step in reversed(checkpoints.all_steps())]
    checkpoints.close()
    for step_path in step_paths:
        step = StepReader(step_path)
        if PARAMS in step.item_names():
            return step
    return None


def load_params(path: PathLike) -> tuple[Any, dict[str, Any]]:
    """Params as host numpy arrays (and the JSON meta, empty if none) from a checkpoint
    root, a run directory or a step directory (`open_step`), whatever devices or processes saved them.

    Callers place them on their own mesh (`jax.device_put` with their shardings).
    """
    return open_step(path).params_and_meta()
