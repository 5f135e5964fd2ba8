"""Orbax checkpoints: one small module with one layout and one resume order for every job.

A checkpoint is a directory of numbered steps (an orbax `CheckpointManager` root); each
step holds named items: `params` (always), and for training runs `opt_state`,
`train_state` (step, rng), `model_state` (where a job has one), `progress` and `config`;
a converted release holds `params` and `meta` (model name, source file). `load_params`
therefore reads the params of a converted `.pth`, of a pretraining run and of a
fine-tuning run alike, from the root or from one step directory.

Resume order (`resume`): a checkpoint in the run's own directory > `--resume` (another
run's directory: the whole state; anything a `WeightsReader` reads: its params, and an
original training `.pth`'s AdamW state too) > the fresh state. Files that are not orbax
checkpoints (`.pth`, hub formats) are read through one `WeightsReader` object, which
`cli.py` gets from the converter: the library never imports `convert`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from semmae_jax.distributed import is_primary, sync
from semmae_jax.metrics_log import RunLog
from semmae_jax.paths import flat_by_path

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
    meta_file = step_dir / META / "metadata"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return load_item(step_dir, PARAMS), meta


def load_item(step_dir: str | Path, name: str) -> Any:
    """One array item of a step directory (`params`, `opt_state`, ...) as host numpy arrays, as saved."""
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        tree = checkpointer.metadata(Path(step_dir) / name).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(Path(step_dir) / name, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves (with shardings where the leaves have them)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions, ...): one line, the run stops."""


class CheckpointDamaged(ValueError):
    """A saved step cannot be read back as it was written."""


def _reason(error: BaseException) -> str:
    """The most telling line of an error chain (the OSError's, if there is one)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror}" + (f" ({seen.filename})" if seen.filename else "")
        seen = seen.__cause__ or seen.__context__
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep orbax / tensorstore's thread tracebacks of a failed read out of the terminal (we report it in one line)."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                yield
            except Exception:
                time.sleep(0.5)  # the failed read's callbacks print from other threads: let them, into the void
                raise
    finally:
        absl.setLevel(level)


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
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, arrays: dict[str, Any], json_items: dict[str, dict[str, Any]]) -> None:
        """Start writing step `step` (asynchronously); a full disk or any I/O error is one clear line."""
        needed = sum(x.nbytes for x in jax.tree.leaves(arrays)) // jax.process_count()
        free = shutil.disk_usage(self.directory).free
        if free < needed * 1.1:
            raise CheckpointWriteError(f"cannot write checkpoint step {step} in {self.directory}: {free / 2**20:.0f} MiB "
                                       f"free, about {needed / 2**20:.0f} MiB needed (disk full?); earlier steps are "
                                       "intact: free space and rerun the same command to resume")
        items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        items.update({name: ocp.args.JsonSave(value) for name, value in json_items.items()})
        with self._write_errors(f"checkpoint step {step}"):
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    @contextlib.contextmanager
    def _write_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointWriteError(f"could not write {what} in {self.directory}: {_reason(error)}; earlier steps "
                                       "are intact: fix the cause and rerun the same command to resume") from error

    def json_item(self, step: int, name: str) -> dict[str, Any] | None:
        """A JSON item of step `step` (None if that step has none)."""
        path = self.directory / str(step) / name / "metadata"
        return json.loads(path.read_text()) if path.is_file() else None

    def set_aside(self, step: int, why: str = "damaged") -> Path:
        """Rename a step to `<step>.<why>` (kept for inspection, invisible to orbax and to resume)."""
        target = self.directory / f"{step}.{why}"
        if is_primary():
            (self.directory / str(step)).rename(target)
        sync(f"set_aside_{step}")
        self._manager.close()
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        return target

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
        with self._write_errors("a checkpoint"):
            self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# ---------------------------------------------------------------- files of other frameworks


class AdamImport(Protocol):
    """Another framework's AdamW state in the Flax params' layout, and where its run was."""

    mu: Any
    nu: Any
    steps: int  # Adam's per-parameter step (its bias correction)
    epoch: int  # the last finished epoch
    betas: tuple[float, float]


class WeightsReader(Protocol):
    """What the jobs need from files that are not this project's orbax checkpoints (`.pth`, ...)."""

    def params(self, path: str, model_name: str | None, img_size: int) -> Any:
        """Params of `path` as host arrays, checked against `model_name` (None: as saved), tables resized."""

    def adam_state(self, path: str, model_name: str) -> AdamImport | None:
        """The AdamW state of an original training checkpoint, None for a file without one."""

    def backbone(self, path: str, img_size: int | None) -> tuple[Any, str, dict[str, Any]]:
        """A frozen ViT encoder (stage 1): (params, registered model name, overrides)."""

    def weights(self, path: str, img_size: int) -> tuple[Any, StatedModel]:
        """Params of `path` as saved (tables resized) and what it says beyond them, in one read."""


class StatedModel(NamedTuple):
    """What a checkpoint states beyond its params (a transformers config, shapes, a saved meta)."""

    fields: dict[str, Any]  # model fields its numerics need (`layer_norm_eps`, `qkv_bias`), when not the default
    class_names: tuple[str, ...] | None  # the labels of its classes in id order (transformers' id2label)


# ---------------------------------------------------------------- the training-state layout


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


@jax.jit
def _array_checksums(tree: Any) -> Any:
    """Per array, two wrapping uint32 sums of its bits: plain and weighted by position (Fletcher-like).

    Computed on the devices where the arrays live (no gather, no host copy), so it costs
    one read of the state; a flipped bit or moved block changes it.
    """

    def words(x: jax.Array) -> jax.Array:
        if x.dtype.itemsize == 4:
            return jax.lax.bitcast_convert_type(x, jnp.uint32)
        if x.dtype.itemsize == 2:
            return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        if x.dtype.itemsize == 1:
            return x.astype(jnp.uint8).astype(jnp.uint32) if x.dtype != jnp.bool_ else x.astype(jnp.uint32)
        return jax.lax.bitcast_convert_type(x, jnp.uint32).sum(-1, dtype=jnp.uint32)

    def checksum(x: jax.Array) -> jax.Array:
        w = words(x)
        position = jnp.zeros(w.shape, jnp.uint32)
        for dim in range(w.ndim):
            position = position * jnp.uint32(w.shape[dim]) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, dim)
        return jnp.stack([w.sum(dtype=jnp.uint32), (w * (position + 1)).sum(dtype=jnp.uint32)])

    return jax.tree.map(checksum, tree)


def checksums(items: dict[str, Any]) -> dict[str, list[int]]:
    """{'params/blocks_0/attn/qkv/kernel': [sum, weighted sum], ...} of the array items."""
    sums = jax.device_get(_array_checksums(items))
    return {path: [int(v) for v in value] for path, value in flat_by_path(sums).items()}


def restore_state(checkpoints: RunCheckpoints, step: int, like: Any) -> Any:
    """The state saved at `step`, restored straight into the shardings of `like` (any mesh, any process count).

    Raises `CheckpointDamaged` (one line) when the step cannot be read or does not match
    the checksums written with it; a state of other shapes (another model) is a ValueError.
    """
    target = abstract_items(abstract_like(like))
    _check_saved_shapes(checkpoints.directory / str(step), target)
    try:
        with _quiet():
            arrays, _ = checkpoints.restore(step, target)
    except Exception as error:  # any failure to read a step that exists means its files are damaged
        raise CheckpointDamaged(f"step {step}: {_reason(error)}") from error
    saved = checkpoints.json_item(step, "checksums")
    if saved is not None:
        bad = sorted(path for path, value in checksums(arrays).items() if saved.get(path) != value)
        if bad:
            raise CheckpointDamaged(f"step {step}: {len(bad)} arrays differ from their checksums ({', '.join(bad[:3])})")
    train = arrays["train_state"]
    return like.replace(step=train["step"], params=arrays["params"], opt_state=arrays["opt_state"],
                        rng=jax.random.wrap_key_data(train["rng"]), model_state=arrays.get("model_state", {}))


def _check_saved_shapes(step_dir: Path, target: dict[str, Any]) -> None:
    """A saved state of other shapes is the user's change (another model), not damage: say so, touch nothing."""
    try:
        with _quiet(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            saved = {name: flat_by_path(checkpointer.metadata(step_dir / name).item_metadata.tree) for name in target}
    except Exception as error:
        raise CheckpointDamaged(f"step {step_dir.name}: {_reason(error)}") from error
    for name, tree in target.items():
        for path, leaf in flat_by_path(tree).items():
            shape = getattr(saved[name].get(path), "shape", None)
            if shape is not None and tuple(shape) != tuple(leaf.shape):
                raise ValueError(f"{step_dir} holds {name}/{path} of shape {tuple(shape)}, this run's model "
                                 f"{tuple(leaf.shape)}: the checkpoint is of another model (--model, --input_size?)")


def save_state(checkpoints: RunCheckpoints, state: Any, steps_per_epoch: int, config: dict[str, Any],
               epoch_stats: dict[str, Any] | None = None) -> None:
    """Checkpoint `state` with where the run is, its config, the per-array checksums and the
    running sums of an unfinished epoch (so a resumed epoch reports whole-epoch figures)."""
    step = int(state.step)
    progress = {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch}
    items = state_items(state)
    json_items = {"progress": progress, "config": config, "checksums": checksums(items)}
    checkpoints.save(step, items, {**json_items, "epoch_stats": epoch_stats} if epoch_stats else json_items)


def holds_training_state(directory: Path) -> bool:
    """Is `directory` a run's checkpoint root whose latest step has an optimizer state?"""
    steps = _step_dirs(directory) if directory.is_dir() else []
    return bool(steps) and (steps[-1][1] / "opt_state").is_dir()


# ---------------------------------------------------------------- the resume order


@dataclasses.dataclass(frozen=True)
class ResumeTarget:
    """What a restored file must fit: the model, and the run's length for continuing a `.pth` run.

    `betas` is the job's AdamW betas; None for a job whose optimizer is not AdamW (no
    `.pth` optimizer continues it).
    """

    model_name: str
    img_size: int
    steps_per_epoch: int
    accum_iter: int = 1
    betas: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """The config of the run that resumes, and which of its fields make it another run if changed."""

    config: dict[str, Any]
    defining: frozenset[str]
    allow_change: bool = False

    def check(self, saved: dict[str, Any] | None, where: Path, log: RunLog) -> None:
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
           target: ResumeTarget | None, log: RunLog, identity: RunIdentity | None = None) -> Any:
    """Continue this run, or start from `--resume`, or keep the fresh `state` (in that order).

    A damaged step of this run is reported in one line, set aside (`<step>.damaged`) and
    the previous one tried; with none readable left, starting over needs `--resume
    scratch`. With `target` None (jobs whose state is not a model's weights), `--resume`
    must be a run directory.
    """
    if run.all_steps():
        restored = _latest_readable(state, run, log, identity)
        if restored is not None:
            return restored
        if resume_from != "scratch":
            raise ValueError(f"no readable checkpoint is left in {run.directory} (damaged steps set aside as "
                             "*.damaged); rerun with --resume scratch to start this run over")
    if not resume_from or resume_from in ("auto", "scratch"):
        return state
    other = Path(resume_from)
    if not other.suffix and holds_training_state(other):
        source = RunCheckpoints(other, async_save=False)
        step = source.latest_step()
        log.print(f"resuming from {other} (step {step}: params, optimizer state and position)")
        restored = restore_state(source, step, state)
        source.close()
        return restored
    if reader is None or target is None:
        raise ValueError(f"--resume {resume_from}: not a run checkpoint directory")
    params = reader.params(resume_from, target.model_name, target.img_size)
    _check_fits(params, state.params, resume_from)
    params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params))
    state = state.replace(params=params)
    adam = reader.adam_state(resume_from, target.model_name) if target.betas and not other.is_dir() else None
    if adam is None:
        log.print(f"starting from the params of {resume_from} (fresh optimizer state, step 0)")
        return state
    return continue_adam_run(state, adam, resume_from, target, log)


def _check_fits(params: Any, model_params: Any, source: str) -> None:
    """Refuse, naming the parameters, weights whose tree is not the model's (a checkpoint of the
    same model name with other fields, e.g. transformers' `qkv_bias: false`)."""
    have, want = set(flat_by_path(params)), set(flat_by_path(model_params))
    if have != want:
        missing, unexpected = sorted(want - have), sorted(have - want)
        raise ValueError(f"--resume {source}: its params do not fit the model of the flags (missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''})")


def _latest_readable(state: Any, run: RunCheckpoints, log: RunLog, identity: RunIdentity | None) -> Any | None:
    """This run's newest step that reads back intact (older ones tried in turn), or None."""
    for step in sorted(run.all_steps(), reverse=True):
        if identity is not None:
            identity.check(run.json_item(step, "config"), run.directory, log)
        try:
            restored = restore_state(run, step, state)
        except CheckpointDamaged as error:
            moved = run.set_aside(step)
            log.print(f"checkpoint {error} in {run.directory}: damaged, moved to {moved.name}; trying the previous one")
            continue
        log.print(f"resuming this run from its checkpoint at step {step} in {run.directory}")
        return restored
    return None


def continue_adam_run(state: Any, adam: AdamImport, path: str, target: ResumeTarget, log: RunLog) -> Any:
    """`state` with `adam`'s moments, at the start of the epoch after the file's, as the original's `--resume`."""
    step = (adam.epoch + 1) * target.steps_per_epoch
    updates = step // target.accum_iter
    opt_state = with_adam_moments(state.opt_state, adam.mu, adam.nu, adam.steps, updates)
    log.print(f"resuming from {path}: params and AdamW state ({adam.steps} updates), continuing at epoch "
              f"{adam.epoch + 1} (step {step})")
    if adam.steps != updates:
        log.print(f"note: the file's run made {adam.steps} optimizer updates in {adam.epoch + 1} epochs, "
                  f"this one makes {updates}: the data or batch differ from the original run's")
    if tuple(adam.betas) != tuple(target.betas):
        log.print(f"note: the file's AdamW betas are {adam.betas}; this run uses {target.betas}")
    return state.replace(step=jax.device_put(jnp.asarray(step, state.step.dtype), state.step.sharding),
                         opt_state=opt_state)


def with_adam_moments(opt_state: Any, mu: Any, nu: Any, adam_count: int, updates: int) -> Any:
    """`opt_state` continued from another framework's AdamW: its moments, its step count.

    `mu` / `nu` are full params-shaped trees (host arrays); each lands where, and as,
    the initialised moment is (frozen parameters, which have none, are skipped). Adam's
    count takes `adam_count` (its bias correction), the schedule's and the accumulator's
    counts take `updates`, the optimizer updates this run's step counter stands for.
    """

    def moments(old: Any, new: Any) -> Any:
        def place(path: tuple, leaf: Any, value: Any) -> Any:
            if isinstance(leaf, optax.MaskedNode):
                return leaf
            if np.shape(value) != leaf.shape:
                raise ValueError(f"AdamW moment of {jax.tree_util.keystr(path)} has shape {np.shape(value)}, the "
                                 f"parameter {leaf.shape} (another image size? moments cannot be resampled)")
            return jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding)

        return jax.tree_util.tree_map_with_path(place, old, new, is_leaf=lambda x: isinstance(x, optax.MaskedNode))

    def count(old: jax.Array, value: int) -> jax.Array:
        return jax.device_put(jnp.asarray(value, old.dtype), old.sharding)

    def replace(node: Any) -> Any:
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(count=count(node.count, adam_count), mu=moments(node.mu, mu), nu=moments(node.nu, nu))
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=count(node.count, updates))
        if isinstance(node, optax.MultiStepsState):
            inner = jax.tree.map(replace, node.inner_opt_state, is_leaf=is_state)
            return node._replace(gradient_step=count(node.gradient_step, updates), inner_opt_state=inner)
        return node

    def is_state(node: Any) -> bool:
        return isinstance(node, (optax.ScaleByAdamState, optax.ScaleByScheduleState, optax.MultiStepsState))

    return jax.tree.map(replace, opt_state, is_leaf=is_state)
