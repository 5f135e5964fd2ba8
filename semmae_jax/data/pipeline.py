"""tf.data input pipelines: per-process numpy batches for training and evaluation.

    source stream of references -> load + transform (parallel, seeded per example)
      -> drop unreadable examples -> batch -> slots fixed by position -> numpy

Guarantees, and how they are kept:

* Determinism: an example's augmentation is seeded by (seed, epoch, example id) with
  stateless ops, the order is fixed by the source, and `options.deterministic` keeps
  tf.data's parallel map in order; so a (seed, epoch) gives the same batches whatever
  `num_workers`.
* Fixed steps: `steps_per_epoch` (= examples // global batch, drop remainder) is the
  same on every process, and every element has a fixed slot (batch `pos // B`, row
  `pos % B`). Exact resume: `epoch_batches(epoch, start_step=s)` starts the stream at
  element s * B, so batches s, s+1, ... are those of the uninterrupted epoch, and the
  skipped images are never read.
* Unreadable images (missing, corrupt, bad part map) never stop an epoch. tf.data
  drops them (`ignore_errors`); the gap in the positions tells which one it was, so it
  is named in a warning and kept in `skipped`. Its slot is then filled with a copy of
  another image of the same batch: shapes, step counts and the positions of all other
  images stay as in a clean run, which resume and multi-host lock-step need (a batch
  with no readable image at all keeps blank rows: zero image, labels -1). In
  evaluation the slot is masked out instead, as is the padding after the last image.
* No TensorFlow op runs on an accelerator: TF is denied the GPUs when it is first
  imported (`tf_runtime`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import jax
import numpy as np

from semmae_jax.data.part_maps import UNLABELLED
from semmae_jax.data.sources import Shard, Source, Stream
from semmae_jax.data.tf_runtime import tf
from semmae_jax.data.transforms import EvalTransform, TrainTransform, Transform, normalize, part_map_problem

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


def normalize_batch(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The batch with its uint8 'image' normalised (float32), whole batches at once (a float32 one,
    of bands normalised by its transform, as it is)."""
    return {**batch, "image": normalize(batch["image"])} if batch["image"].dtype == tf.uint8 else batch


def make_shard(process_index: int | None, process_count: int | None) -> Shard:
    """This process's shard; JAX's process index and count by default."""
    shard = Shard(
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
    )
    if not 0 <= shard.index < shard.count:
        raise ValueError(f"process_index {shard.index} is not in [0, process_count={shard.count})")
    return shard


def _element_dataset(
    source: Source,
    stream: Stream,
    transform: Transform,
    key: tuple[int, int],
    process_batch: int,
    num_workers: int | None,
    normalized: bool,
) -> tuple[tf.data.Dataset, dict[str, np.ndarray]]:
    """Batches of transformed elements, each with its 'pos'; and a blank row of the same structure.

    Images stay uint8 unless `normalized`. The blank row (missing images, padding) is
    -1 where a signed integer (no label, no part, no position), 0 elsewhere (so a
    normalised blank image is the mean colour).
    """

    def element(ref: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        seed = tf.random.experimental.stateless_fold_in(tf.constant(key, tf.int64), ref["id"])
        out = transform(source.load(ref), seed)
        return {**out, "label": tf.cast(ref["label"], tf.int32), "pos": ref["pos"]}

    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1  # parallel over images, not inside one: no idle spinning
    if num_workers:
        options.threading.private_threadpool_size = num_workers
    elements = stream.refs.map(element, num_parallel_calls=num_workers or tf.data.AUTOTUNE)
    batches = elements.ignore_errors().batch(process_batch)
    if normalized:
        batches = batches.map(normalize_batch, num_parallel_calls=tf.data.AUTOTUNE)
    blank = {
        name: np.full(spec.shape[1:], -1 if spec.dtype.is_integer and not spec.dtype.is_unsigned else 0,
                      spec.dtype.as_numpy_dtype)
        for name, spec in batches.element_spec.items()
    }
    return batches.prefetch(tf.data.AUTOTUNE).with_options(options), blank


def _rows(batch: Batch) -> dict[int, Batch]:
    return {int(pos): {name: array[row] for name, array in batch.items()} for row, pos in enumerate(batch["pos"])}


def _fixed_slots(
    batches: Iterator[Batch], steps: range, process_batch: int, blank: Batch
) -> Iterator[tuple[int, Batch, np.ndarray]]:
    """(step, batch, present) with every element in its slot: batch pos // B, row pos % B.

    Elements arrive in order, some missing (dropped as unreadable, or beyond the end of
    an evaluation stream); their rows are `blank` and `present` False. While nothing
    is missing, tf.data's batches pass through untouched.
    """
    pending: dict[int, Batch] = {}  # rows of batches that did not line up with a step
    exhausted = False

    def pull() -> Batch | None:
        nonlocal exhausted
        batch = None if exhausted else next(batches, None)
        exhausted = batch is None
        return batch

    for step in steps:
        low, high = step * process_batch, (step + 1) * process_batch
        if not pending and (batch := pull()) is not None:
            if np.array_equal(batch["pos"], np.arange(low, high)):
                yield step, batch, np.ones(process_batch, bool)
                continue
            pending.update(_rows(batch))
        while max(pending, default=-1) < high - 1 and (batch := pull()) is not None:
            pending.update(_rows(batch))
        rows = [pending.pop(pos, None) for pos in range(low, high)]
        full = {name: np.stack([blank[name] if row is None else row[name] for row in rows]) for name in blank}
        yield step, full, np.array([row is not None for row in rows])


def _fill_gaps(batch: Batch, present: np.ndarray) -> Batch:
    """Rows of unreadable images <- copies of readable rows of the same batch (cyclically)."""
    if present.all() or not present.any():
        return batch
    missing, donors = np.flatnonzero(~present), np.flatnonzero(present)
    source_rows = donors[np.arange(len(missing)) % len(donors)]
    filled = {}
    for name, array in batch.items():
        filled[name] = array.copy()
        filled[name][missing] = array[source_rows]
    return filled


class _Loader:
    """What training and evaluation loaders share: the shard, the batching, the skip log."""

    normalized: bool  # images normalised (float32) on the host, or left uint8 for the device

    def __init__(
        self,
        source: Source,
        process_batch: int,
        transform: Transform,
        num_workers: int | None,
        process_index: int | None,
        process_count: int | None,
    ) -> None:
        self.source, self.process_batch, self.transform, self.num_workers = source, process_batch, transform, num_workers
        self.shard = make_shard(process_index, process_count)
        self.skipped: list[str] = []  # unreadable images met so far (names), in order

    def _batches(self, stream: Stream, key: tuple[int, int], steps: range) -> Iterator[tuple[Batch, np.ndarray]]:
        """(batch, present) for `steps` of `stream`; unreadable examples are named, logged and kept in `skipped`."""
        dataset, blank = _element_dataset(
            self.source, stream, self.transform, key, self.process_batch, self.num_workers, self.normalized
        )
        for step, batch, present in _fixed_slots(dataset.as_numpy_iterator(), steps, self.process_batch, blank):
            self._check_part_maps(stream, step, batch, present)
            for pos in step * self.process_batch + np.flatnonzero(~present):
                if pos < stream.length:
                    self.skipped.append(stream.name(pos))
                    log.warning("skipped an unreadable image (or its part map): %s", self.skipped[-1])
            yield batch, present


    def _check_part_maps(self, stream: Stream, step: int, batch: Batch, present: np.ndarray) -> None:
        """A part map the transform refused stops the run, naming the map and what is wrong with it."""
        if "part_labels" not in batch:
            return
        for row in np.flatnonzero(present & (batch["part_labels"].min(axis=1) < UNLABELLED)):
            problem = part_map_problem(batch["part_labels"][row], getattr(self.transform, "num_parts", None))
            if problem:
                name = stream.name(step * self.process_batch + row)
                where = self.source.part_map_name(name) if hasattr(self.source, "part_map_name") else "its part map"
                raise ValueError(f"the part map of {name} ({where}) {problem}")


class TrainLoader(_Loader):
    """One process's training batches, epoch by epoch.

    Yields {'image': uint8 [B, S, S, 3], 'part_labels': int32 [B, L], 'label': int32 [B]}
    with B = `process_batch`, this process's share of the global batch (global = B *
    process count). Images stay uint8 (a quarter of the bytes, no float work on the
    host): `global_arrays.prefetch_to_device` normalises them on the devices. Images
    the source could not read are listed in `skipped`.
    """

    normalized = False

    def __init__(
        self,
        source: Source,
        *,
        process_batch: int,
        transform: TrainTransform,
        seed: int = 0,
        num_workers: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        super().__init__(source, process_batch, transform, num_workers, process_index, process_count)
        self.seed = seed
        self.steps_per_epoch = source.steps_per_epoch(process_batch, self.shard)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{source.num_examples} examples do not fill one global batch of {process_batch} x {self.shard.count}"
            )

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches start_step .. steps_per_epoch - 1 of `epoch`, as in an uninterrupted epoch."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is not in [0, {self.steps_per_epoch}]")
        stream = self.source.train_stream(epoch, self.seed, self.process_batch, self.shard, start_step)
        already, blank = len(self.skipped), 0
        for batch, present in self._batches(stream, (self.seed, epoch), range(start_step, self.steps_per_epoch)):
            blank += 0 if present.any() else len(present)  # no readable image in the batch to copy from
            filled = _fill_gaps(batch, present)
            yield {name: filled[name] for name in ("image", "part_labels", "label")}
        if len(self.skipped) > already:
            count = len(self.skipped) - already
            replaced = f"{count - blank} replaced by others of their batch" if count > blank else ""
            blanked = f"{blank} left blank (mean colour, no label: a batch with no readable image)" if blank else ""
            log.warning("epoch %d: %d unreadable image(s): %s", epoch, count, "; ".join(filter(None, (replaced, blanked))))


class EvalLoader(_Loader):
    """One process's evaluation batches: every example exactly once across processes.

    Yields {'image': float32 [B, S, S, 3], 'label': int32 [B], 'mask': bool [B]}, and
    'part_labels' int32 [B, L] when the transform makes them; `mask` is False on padding
    (after the last example) and on unreadable images, which metrics must ignore. Every
    process yields `num_batches` batches. Images are normalised on the host (evaluation
    is not where the input time goes, and its batches also feed host-side tools).
    """

    normalized = True

    def __init__(
        self,
        source: Source,
        *,
        process_batch: int,
        transform: EvalTransform,
        num_workers: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        super().__init__(source, process_batch, transform, num_workers, process_index, process_count)
        largest_share = math.ceil(source.num_examples / self.shard.count)
        self.num_batches = math.ceil(largest_share / process_batch)

    def batches(self) -> Iterator[Batch]:
        """All `num_batches` batches of this process's share, padded and masked."""
        for batch, present in self._batches(self.source.eval_stream(self.shard), (0, 0), range(self.num_batches)):
            yield {**{name: batch[name] for name in ("image", "label", "part_labels") if name in batch}, "mask": present}


def eval_batches(
    source: Source,
    *,
    process_batch: int,
    img_size: int = 224,
    num_workers: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Shorthand: `EvalLoader(...)` with the standard `EvalTransform(img_size)`, iterated."""
    loader = EvalLoader(
        source,
        process_batch=process_batch,
        transform=EvalTransform(img_size),
        num_workers=num_workers,
        process_index=process_index,
        process_count=process_count,
    )
    return loader.batches()
