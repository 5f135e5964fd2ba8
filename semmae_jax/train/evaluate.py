"""Classification evaluation: top-1 / top-5 / loss over every image exactly once.

The evaluation loader pads the last batches and marks the padding (`mask`), so the
sums below ignore it; counts are integers and the sums are reduced over the global
(sharded) batch inside the jitted step, so the figures do not depend on the mesh, the
batch size or the number of processes. Output in the original's words:
`* Acc@1 X Acc@5 Y loss Z`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from semmae_jax import data, sharding
from semmae_jax.checkpoint import RunCheckpoints
from semmae_jax.data.global_arrays import prefetch_to_device
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.runtime.distributed import is_primary
from semmae_jax.runtime.run_log import RunLog

LogitsFn = Callable[[Any, jax.Array], jax.Array]  # (variables, images) -> logits [B, C]
NAMED_CLASSES_SHOWN = 20  # per-class lines printed by `eval`; beyond, only the weakest


@dataclasses.dataclass(frozen=True)
class EvalResult:
    acc1: float  # percent
    acc5: float
    loss: float  # mean cross-entropy
    count: int
    per_class: dict[int, dict[str, float]]
    skipped: int = 0  # unreadable images of this process's share, left out of every figure

    def original_lines(self) -> str:
        """What MAE's `engine_finetune.evaluate` and `main_finetune` print (and the images left out)."""
        left_out = f"\n{self.skipped} unreadable image(s) left out (named in the warnings above)" if self.skipped else ""
        return (f"* Acc@1 {self.acc1:.3f} Acc@5 {self.acc5:.3f} loss {self.loss:.3f}\n"
                f"Accuracy of the network on the {self.count} test images: {self.acc1:.1f}%{left_out}")

    def metrics(self) -> dict[str, float]:
        return {"test_acc1": self.acc1, "test_acc5": self.acc5, "test_loss": self.loss}

    def write_per_class(self, path: str | Path, class_names: Sequence[str] | None = None) -> None:
        """{class id: {'images', 'acc1'} (and 'name', from the checkpoint's labels)} as JSON."""
        named = {k: {**v, "name": class_names[k]} if class_names else v for k, v in sorted(self.per_class.items())}
        epath.Path(path).write_text(json.dumps({str(k): v for k, v in named.items()}, indent=1))

    def per_class_lines(self, class_names: Sequence[str], shown: int = NAMED_CLASSES_SHOWN) -> str:
        """Top-1 per class under the checkpoint's class names: every class, or the `shown` weakest."""
        ranked = sorted(self.per_class.items(), key=lambda item: item[1]["acc1"])
        listed = ranked if len(ranked) <= shown else ranked[:shown]
        title = "Acc@1 per class" if listed is ranked else f"Acc@1 of the {shown} weakest of {len(ranked)} classes"
        rows = [f"  {class_names[c]:<24} {v['acc1']:6.1f}%  ({v['images']} images)" for c, v in sorted(listed)]
        return "\n".join([f"{title} (the checkpoint's id2label):", *rows])


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """Masked sums for one batch: correct@1, correct@5, cross-entropy, per-class counts."""
    logits = logits.astype(jnp.float32)
    valid = mask.astype(jnp.int32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit1 = (top5[:, 0] == labels).astype(jnp.int32) * valid
    hit5 = jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.int32) * valid
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * valid[:, None]
    return {
        "correct1": hit1.sum(), "correct5": hit5.sum(), "loss": jnp.sum(nll * mask), "count": valid.sum(),
        "class_count": one_hot.sum(0), "class_correct1": (one_hot * hit1[:, None]).sum(0),
    }


def make_eval_step(logits_fn: LogitsFn, num_classes: int, mesh: jax.sharding.Mesh, variables_sharding: Any) -> Callable:
    """Jitted (variables, batch, running sums) -> running sums, all on the devices."""

    @sharding.with_logical_rules
    def step(variables: Any, batch: dict[str, jax.Array], sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
        new = batch_sums(logits_fn(variables, batch["image"]), batch["label"], batch["mask"], num_classes)
        return jax.tree.map(jnp.add, sums, new)

    replicated = sharding.replicated(mesh)
    return jax.jit(step, in_shardings=(variables_sharding, sharding.batch_sharding(mesh), replicated),
                   out_shardings=replicated, donate_argnums=(2,))


def evaluate(eval_step: Callable, variables: Any, batches: Iterable[dict[str, np.ndarray]], num_batches: int,
             num_classes: int, mesh: jax.sharding.Mesh) -> EvalResult:
    """Run the loader once; every process gets the same result."""
    zero = {"correct1": np.int32(0), "correct5": np.int32(0), "loss": np.float32(0), "count": np.int32(0),
            "class_count": np.zeros(num_classes, np.int32), "class_correct1": np.zeros(num_classes, np.int32)}
    sums = jax.device_put(zero, sharding.replicated(mesh))
    for batch in tqdm(prefetch_to_device(batches, mesh), total=num_batches, desc="eval", disable=not is_primary()):
        sums = eval_step(variables, batch, sums)
    sums = jax.tree.map(np.asarray, jax.device_get(sums))
    count = int(sums["count"])
    per_class = {
        c: {"images": int(n), "acc1": 100.0 * int(k) / int(n)}
        for c, (n, k) in enumerate(zip(sums["class_count"], sums["class_correct1"], strict=True)) if n
    }
    return EvalResult(
        acc1=100.0 * int(sums["correct1"]) / max(count, 1),
        acc5=100.0 * int(sums["correct5"]) / max(count, 1),
        loss=float(sums["loss"]) / max(count, 1),
        count=count,
        per_class=per_class,
    )


def check_classes(found: int, nb_classes: int) -> None:
    """A dataset with more classes than the head has would train on labels the head cannot output."""
    if found > nb_classes:
        raise ValueError(f"the dataset has {found} classes but --nb_classes is {nb_classes}")


def check_class_order(folders: Sequence[str] | None, class_names: Sequence[str] | None, source: str) -> None:
    """Refuse a checkpoint that names the dataset's classes in another order: its logit i is
    not the folder with label i, so every figure would be wrong without a visible error."""
    if not folders or not class_names or list(folders) == list(class_names) or sorted(folders) != sorted(class_names):
        return
    first = next(i for i, (a, b) in enumerate(zip(folders, class_names, strict=True)) if a != b)
    raise ValueError(f"{source}: its id2label orders the dataset's classes differently (label {first} is "
                     f"{class_names[first]!r} in the checkpoint, {folders[first]!r} in the dataset's class folders)")


@dataclasses.dataclass
class Validation:
    """The validation split of a classification job, ready to score any variables on the mesh.

    Keeps every result of this process's part of the run (`results`).
    """

    loader: Any  # data.EvalLoader
    step: Callable
    num_classes: int
    mesh: jax.sharding.Mesh
    results: list[EvalResult] = dataclasses.field(default_factory=list)

    @classmethod
    def build(cls, source: Any, transform: Any, batch: BatchGeometry, num_workers: int,
              logits_fn: LogitsFn, num_classes: int, mesh: jax.sharding.Mesh, variables_sharding: Any) -> Validation:
        """Loader (this process's share of `batch`) and jitted step for `source`."""
        sharding.check_global_batch(batch.global_batch, mesh, "evaluation batch")
        loader = data.EvalLoader(source, process_batch=batch.per_process, transform=transform, num_workers=num_workers)
        return cls(loader, make_eval_step(logits_fn, num_classes, mesh, variables_sharding), num_classes, mesh)

    def __call__(self, variables: Any) -> EvalResult:
        before = len(self.loader.skipped)
        result = evaluate(self.step, variables, self.loader.batches(), self.loader.num_batches, self.num_classes,
                          self.mesh)
        self.results.append(dataclasses.replace(result, skipped=len(self.loader.skipped) - before))
        return self.results[-1]



class BestKeeper:
    """The params of the run's best top-1 in their own checkpoint root (`<output_dir>/best`).

    Orbax keeps the step by the top-1 saved with it (`best_metric`), so a resumed run
    knows the best of the epochs before it: a worse epoch after a resume never replaces
    it, and the "Max accuracy" printed is the whole run's, however often it was resumed.
    """

    METRIC = "test_acc1"

    def __init__(self, directory: Any, model_name: str, log: RunLog) -> None:
        self.checkpoints = RunCheckpoints(directory, max_to_keep=1, best_metric=self.METRIC)
        self.model_name, self.log = model_name, log
        best = self.checkpoints.best_step()
        self.acc1 = self.checkpoints.metrics(best)[self.METRIC] if best is not None else float("-inf")

    def offer(self, result: EvalResult, params: Any, step: int, epoch: int) -> str:
        """Keep `params` if `result` beats the run's best; the original's lines with the run's maximum."""
        if result.acc1 > self.acc1 and step not in self.checkpoints.all_steps():
            self.acc1 = result.acc1
            meta = {"model": self.model_name, "epoch": epoch, **result.metrics()}
            self.checkpoints.save(step, {"params": params}, {"meta": meta}, metrics=result.metrics())
            if self.log.enabled:
                result.write_per_class(self.log.output_dir / "per_class_accuracy.json")
        return result.original_lines() + f"\nMax accuracy: {self.acc1:.2f}%"

    def close(self) -> None:
        self.checkpoints.wait()
        self.checkpoints.close()


def report(result: EvalResult, log: RunLog, class_names: Sequence[str] | None = None) -> None:
    """What `--eval` prints and writes, whatever the job: the original's lines, top-1 per class
    under the checkpoint's class names (when it has them), `per_class_accuracy.json`."""
    log.print(result.original_lines() + (f"\n{result.per_class_lines(class_names)}" if class_names else ""))
    if log.enabled:
        result.write_per_class(log.output_dir / "per_class_accuracy.json", class_names)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `--eval` scores: the validation split, the variables it scores and the class names
    the weights carry (for the per-class lines), as a job's `evaluation` hook builds them."""

    validation: Validation
    variables: Any
    class_names: Sequence[str] | None = None


@dataclasses.dataclass
class EpochEvaluation:
    """A classification job's epoch-end hook: score the state on the validation split and keep
    the best params. The skeleton hands it to the job's `result`, which reads `last`."""

    validation: Validation
    variables: Callable[[Any], Any]  # TrainState -> the variables `validation` scores
    best: BestKeeper
    log: RunLog

    @classmethod
    def keeping_best(cls, validation: Validation, variables: Callable[[Any], Any], model_name: str,
                     log: RunLog) -> EpochEvaluation:
        """The hook with the run's best params kept in `<output_dir>/best`."""
        return cls(validation, variables, BestKeeper(log.output_dir / "best", model_name, log), log)

    def __call__(self, epoch: int, state: Any, first_batch: Any) -> dict[str, float]:
        result = self.validation(self.variables(state))
        self.log.print(self.best.offer(result, state.params, int(state.step), epoch))
        return result.metrics()

    @property
    def last(self) -> EvalResult | None:
        """The latest epoch's figures (None before the first epoch end)."""
        return self.validation.results[-1] if self.validation.results else None

    def close(self) -> None:
        self.best.close()
