"""A checkpoint reads back as it was written, or is reported damaged in one line.

Every training checkpoint carries per-array checksums computed on the devices when it
was saved (`checksums`); a restore recomputes and compares them (`verify`). A step that
cannot be read or does not match is `CheckpointDamaged`: resume sets it aside and tries
the one before (`resume.py`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from semmae_jax.key_paths import flat_by_path


class CheckpointDamaged(ValueError):
    """A saved step cannot be read back as it was written."""


def failure_reason(error: BaseException) -> str:
    """The most telling line of an error chain: the OSError's, if there is one, else the innermost
    error's (the library's own words, e.g. tensorstore's `OUT_OF_RANGE: ...`: the wrappers around it
    only say where, which the caller says itself), with object reprs such as `<bound method ...>`
    left out."""
    chain = []
    seen = error
    while seen is not None and seen not in chain:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror}" + (f" ({seen.filename})" if seen.filename else "")
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    lines = (_first_line(link) for link in reversed(chain))
    return next((line for line in lines if line), type(error).__name__)


_OBJECT_REPR = re.compile(r"<(?:bound method |function |[\w.]+ object at 0x)[^>\n]*>?")


def _first_line(error: BaseException) -> str:
    """The first line of `error`'s message without object reprs (a multi-line repr cut at its first line)."""
    text = str(error).strip()
    return _OBJECT_REPR.sub("", text.splitlines()[0] if text else "").strip()[:300]


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Read a checkpoint with any failure kept to one line: `CheckpointDamaged("<what>: <reason>")`.

    The noise of a failed read is kept out of the terminal: orbax's log records, and the
    errors of the reads orbax abandons. Orbax restores on an event loop that it closes as
    soon as one read fails, leaving the other reads pending on it: every tensorstore read
    still in flight then completes into the closed loop (Python prints each `RuntimeError:
    Event loop is closed` as a traceback, dozens for one truncated file); each pending read
    coroutine, once collected, is closed unfinished and turns the GeneratorExit into its own
    "Encountered error while reading array index" (`Exception ignored in: <coroutine object
    _read_array_index_and_device_put ...>`, with the whole TensorStore spec); and the tasks
    that failed beside the first, or were left pending, log their own record when collected
    ("Task exception was never retrieved", "Task was destroyed but it is pending!"). All
    arrive late, from other threads or at exit (some before the first failure reaches this
    block), however far the reads got, and say nothing the one line does not, so they are
    dropped for the rest of the process: only those of orbax's own reads
    (`_drop_abandoned_read_errors`, `_drop_abandoned_task_errors`).
    """
    _drop_abandoned_read_errors()
    _drop_abandoned_task_errors()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    except CheckpointDamaged:
        raise
    except Exception as error:  # any failure to read a step that exists means its files are damaged
        raise CheckpointDamaged(f"{what}: {failure_reason(error)}") from error
    finally:
        absl.setLevel(level)


def _drop_abandoned_read_errors() -> None:
    """Wrap `sys.unraisablehook` (whichever is current) so that it drops the errors of abandoned
    reads (`_abandoned_read`), and passes everything else on."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        if not _abandoned_read(unraisable):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


_ORBAX = os.path.dirname(ocp.__file__) + os.sep


def _abandoned_read(unraisable: Any) -> bool:
    """asyncio's "Event loop is closed" raised in a callback into orbax's closed loop, or the error an
    orbax coroutine raises when it is closed unfinished (GeneratorExit in its chain)."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    coroutine = unraisable.object
    return inspect.iscoroutine(coroutine) and coroutine.cr_code.co_filename.startswith(_ORBAX) and _closing(error)


def _closing(error: BaseException | None) -> bool:
    """Was `error` raised while a GeneratorExit was being handled (a coroutine closed unfinished)?"""
    while error is not None:
        if isinstance(error, GeneratorExit):
            return True
        error = error.__cause__ or error.__context__
    return False


_ABANDONED_TASK_RECORDS = ("Task exception was never retrieved", "Task was destroyed but it is pending!")


class _AbandonedTasks(logging.Filter):
    """Drops asyncio's record of a task whose coroutine is orbax's (the record names its file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(_ABANDONED_TASK_RECORDS) and _ORBAX in message)


def _drop_abandoned_task_errors() -> None:
    """Keep asyncio's records of orbax's abandoned read tasks (`_ABANDONED_TASK_RECORDS`) out."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedTasks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedTasks())


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


def verify(step: int, arrays: dict[str, Any], saved: dict[str, list[int]] | None) -> None:
    """Raise `CheckpointDamaged` naming the arrays of `step` that differ from the checksums saved with them."""
    if saved is None:  # written before checksums existed
        return
    bad = sorted(path for path, value in checksums(arrays).items() if saved.get(path) != value)
    if bad:
        raise CheckpointDamaged(f"step {step}: {len(bad)} arrays differ from their checksums ({', '.join(bad[:3])})")
