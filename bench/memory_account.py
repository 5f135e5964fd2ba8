"""The memory account of a job's training step: what its loss saves for the backward pass, per image.

    python bench/memory_account.py --model mae_vit_base_patch8 --attention cudnn --dtype bfloat16 \
        [--job pretrain|finetune] [--remat POLICY] [--top 20] [--batch N]

A training step keeps, between the forward and the backward pass, every value the backward
pass needs (JAX's "residuals"); at a large batch they are most of the step's memory. The step
here is the job's own (`bench/common.py` builds it from the job's flags), traced on abstract
inputs whose batch size is a symbol `b`: nothing is allocated, so ViT-B/8 and ViT-L/16 at
224 px are counted on a laptop. When the traced step differentiates its loss
(`jax.value_and_grad(loss_fn)(params)`), the loss and its arguments are handed to JAX's own
`saved_residuals`, which names every residual by the op and source line that made it, and the
trace stops there (the optimizer's update keeps nothing for a backward pass). A residual whose shape holds `b`
costs that much per image; one without it (the compute-dtype copies of the weights) is paid
once per step whatever the batch.

attention='cudnn' is traced with JAX's cuDNN checks answered as on an H200 (`bench.cudnn_on_cpu`)
where JAX runs on no GPU: the trace is the one the H200 builds. `--batch N` also compiles the
step for a batch of N (abstract inputs again) and prints XLA's `memory_analysis()`; on a GPU it
then runs the step once and prints the allocator's peak beside it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

from bench.common import abstract_batch, abstract_job_step, finetune_job, one_device_mesh, pretrain_job  # noqa: E402
from bench.cudnn_on_cpu import H200, cudnn_as_on  # noqa: E402
from semmae_jax.models.layers import REMAT_POLICIES  # noqa: E402
from semmae_jax.train.skeleton import Job  # noqa: E402

JOBS: dict[str, Callable[..., Job]] = {"pretrain": pretrain_job, "finetune": finetune_job}
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Saved:
    """Residuals of one kind: made by the same op on the same source line, of the same shape."""

    source: str  # JAX's words: 'output of mul from semmae_jax/models/layers.py:264:26 (Block.__call__)'
    shape: str  # 'bf16[b,785,512]': `b` is the batch
    count: int
    bytes_per_image: int  # each
    bytes_fixed: int  # each, paid once per step whatever the batch

    @property
    def mib_per_image(self) -> float:
        return self.count * self.bytes_per_image / MIB

    @property
    def argument(self) -> bool:
        return self.source.startswith("from the argument")


@dataclasses.dataclass(frozen=True)
class Account:
    """Everything the step's loss keeps for its backward pass, the largest per image first."""

    job: str
    model: str
    attention: str
    dtype: str
    remat: str
    rows: tuple[Saved, ...]

    @property
    def mib_per_image(self) -> float:
        return sum(row.mib_per_image for row in self.rows)

    @property
    def mib_fixed(self) -> float:
        """Made by the step once whatever the batch: the weights' compute-dtype copies, constants."""
        return sum(row.count * row.bytes_fixed for row in self.rows if not row.argument) / MIB

    @property
    def mib_arguments(self) -> float:
        """The differentiated arguments themselves (the parameters): kept, but held by the state anyway."""
        return sum(row.count * row.bytes_fixed for row in self.rows if row.argument) / MIB

    def report(self, top: int) -> str:
        """The account as a table: MiB per image of each kind of residual, then the totals."""
        lines = [f"{self.job} step of {self.model}, attention {self.attention}, {self.dtype}, remat {self.remat}: "
                 f"what the loss saves for the backward pass",
                 f"{'MiB/image':>9}  {'count':>5}  {'shape':<24} source"]
        per_image = [row for row in self.rows if row.bytes_per_image]
        for row in per_image[:top]:
            lines.append(f"{row.mib_per_image:9.2f}  {row.count:5d}  {row.shape:<24} {row.source}")
        rest = per_image[top:]
        if rest:
            lines.append(f"{sum(r.mib_per_image for r in rest):9.2f}  {sum(r.count for r in rest):5d}  "
                         f"{'':<24} ({len(rest)} more kinds)")
        lines.append(f"total: {self.mib_per_image:.1f} MiB per image; {self.mib_fixed:.1f} MiB once per step "
                     f"whatever the batch (weights in the compute dtype, constants), besides the parameters "
                     f"themselves ({self.mib_arguments:.1f} MiB, held by the state anyway)")
        return "\n".join(lines)


def build_job(kind: str, model: str, attention: str = "xla", dtype: str = "bfloat16", remat: str = "none",
              *flags: str) -> Job:
    """`main.py KIND --model MODEL --attention ATTENTION --dtype DTYPE --remat REMAT FLAGS...`."""
    if kind not in JOBS:
        raise ValueError(f"--job must be one of {sorted(JOBS)}, got {kind!r}")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"--remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
    return JOBS[kind](model, "--attention", attention, "--dtype", dtype, "--remat", remat, *flags)


def account(job: Job) -> Account:
    """The saved residuals of `job`'s step per image, traced with a symbolic batch (nothing allocated)."""
    mesh = one_device_mesh()
    batch, = jax.export.symbolic_shape("b")
    residuals: list[tuple[Any, str]] = []
    with _gpu_checks(job):
        abstract_state, step, built = abstract_job_step(job, mesh, 1)
        with jax.set_mesh(mesh), _recording(residuals), contextlib.suppress(_Recorded):
            jax.make_jaxpr(step)(abstract_state, abstract_batch(job, built.model, batch, mesh))
            raise RuntimeError(f"the {job.name} step differentiated nothing through jax.value_and_grad: no account")
    c = job.config
    return Account(job.name, c.model, c.attention, c.dtype, str(c.remat), _rows(residuals))


def _gpu_checks(job: Job) -> contextlib.AbstractContextManager:
    """cuDNN attention traced as on an H200 where JAX runs on no GPU."""
    on_gpu = jax.devices()[0].platform == "gpu"
    return contextlib.nullcontext() if on_gpu or job.config.attention != "cudnn" else cudnn_as_on(H200)


class _Recorded(Exception):
    """The step's differentiated function is accounted for: the rest of the step need not be traced."""


@contextlib.contextmanager
def _recording(residuals: list[tuple[Any, str]]) -> Iterator[None]:
    """`jax.value_and_grad` as the step calls it, with `saved_residuals` of the function it differentiates
    (at the step's own traced arguments) put into `residuals`; then the trace stops (`_Recorded`)."""

    def value_and_grad(fun: Callable, *args: Any, **kwargs: Any) -> Callable:
        def call(*primals: Any) -> Any:
            residuals.extend(saved_residuals(fun, *primals))
            raise _Recorded
        return call

    with mock.patch.object(jax, "value_and_grad", value_and_grad):
        yield


def _rows(residuals: list[tuple[Any, str]]) -> tuple[Saved, ...]:
    """Residuals grouped by (source, shape), the largest per image first."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    sizes: dict[tuple[str, str], tuple[int, int]] = {}
    for aval, source in residuals:
        key = (source.replace(f"{REPO}/", ""), aval.str_short(short_dtypes=True))
        counts[key] += 1
        sizes[key] = _bytes(aval)
    rows = [Saved(source, shape, count, *sizes[source, shape]) for (source, shape), count in counts.items()]
    return tuple(sorted(rows, key=lambda r: (-r.mib_per_image, -r.count * r.bytes_fixed, r.source)))


def _bytes(aval: Any) -> tuple[int, int]:
    """(bytes per image, bytes whatever the batch) of a residual whose dims may hold the symbol `b`."""
    itemsize = getattr(aval.dtype, "itemsize", 0)

    def size(images: int) -> int:
        total = 1
        for dim in getattr(aval, "shape", ()):
            total *= dim if isinstance(dim, int) else dim._evaluate({"b": images})
        return total * itemsize

    fixed, one, two = size(0), size(1), size(2)
    if two - one != one - fixed:
        raise ValueError(f"a residual {aval.str_short()} grows faster than the batch: no per-image figure")
    return one - fixed, fixed


def compiled_memory(job: Job, batch: int) -> str:
    """XLA's memory analysis of the step compiled for `batch` images, and on a GPU the allocator's peak
    after one step at that batch."""
    from bench.common import job_step
    from bench.gpu_jax import device_memory, synthetic_batch
    from semmae_jax.train.step_memory import step_bytes

    mesh = one_device_mesh()
    on_gpu = jax.devices()[0].platform == "gpu"
    if job.config.attention == "cudnn" and not on_gpu:
        raise ValueError("--batch: attention='cudnn' compiles only on an NVIDIA GPU (the account itself runs here)")
    if on_gpu:
        state, step, built = job_step(job, mesh, batch)
        with jax.set_mesh(mesh):
            data = synthetic_batch(job.name, job, built.model, batch, mesh)
            compiled = step.lower(state, data).compile()
            jax.block_until_ready(compiled(state, data))
    else:
        abstract_state, step, built = abstract_job_step(job, mesh, batch)
        with jax.set_mesh(mesh):
            compiled = step.lower(abstract_state, abstract_batch(job, built.model, batch, mesh)).compile()
    m, need = compiled.memory_analysis(), step_bytes(compiled)
    lines = [f"compiled step, batch {batch}, {jax.devices()[0].device_kind}: XLA's memory_analysis() "
             f"arguments {m.argument_size_in_bytes / MIB:.1f} MiB, outputs {m.output_size_in_bytes / MIB:.1f}, "
             f"temporaries {m.temp_size_in_bytes / MIB:.1f}, donated {m.alias_size_in_bytes / MIB:.1f}: "
             f"{need / MIB:.1f} MiB in all, {m.temp_size_in_bytes / MIB / batch:.1f} MiB of temporaries per image"]
    stats = device_memory() if on_gpu else None
    if stats and "peak_bytes_in_use" in stats:
        lines.append(f"measured: the allocator's peak_bytes_in_use {stats['peak_bytes_in_use'] / MIB:.0f} MiB "
                     f"({stats['peak_bytes_in_use'] / MIB / batch:.1f} MiB per image)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch8")
    parser.add_argument("--job", default="pretrain", choices=sorted(JOBS))
    parser.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none", choices=list(REMAT_POLICIES))
    parser.add_argument("--top", type=int, default=20, help="kinds of residual listed (the rest are summed)")
    parser.add_argument("--batch", type=int, help="also compile the step for this batch (and run it on a GPU)")
    args = parser.parse_args(argv)
    try:
        job = build_job(args.job, args.model, args.attention, args.dtype, args.remat)
        print(account(job).report(args.top), flush=True)
        if args.batch:
            print(compiled_memory(job, args.batch))
    except ValueError as error:
        raise SystemExit(f"memory_account: {error}") from None


if __name__ == "__main__":
    main()
