"""The GPU suite: one command, one GPU, every figure side by side in one run.

    python bench/gpu.py --out results/gpu.json [--budget_s 420] [--cache_dir DIR] [--steps 10]
    python bench/gpu.py --rows 'cudnn|ViT-H' ...   # only these rows (with the ceilings, the batches they take)
    python bench/gpu.py --smoke --out /tmp/gpu_smoke.json   # every code path, on CPU, test models

Needs jax, flax, optax, orbax-checkpoint, torch, transformers and timm; no TensorFlow and no
install step (it imports neither `semmae_jax.data` nor anything that imports TensorFlow). The
rows run in the order of importance below, each in its own process (so that its peak memory is
its own, an out-of-memory cannot poison the next row, and JAX and PyTorch never share the
device); each row is printed when done, the JSON is rewritten after every row, and when
`--budget_s` is spent the running row is stopped and the rest listed as skipped.

1. ceilings: a bf16 8192^3 matmul (TFLOP/s) and a device copy (GB/s, read + write);
2. MAE pretraining steps (bf16 compute, float32 params, AdamW) of ViT-L/16, ViT-B/16 and SemMAE
   ViT-B/8 (setting 3): attention 'xla', attention 'cudnn', and transformers' ViTMAE (SDPA,
   bf16 autocast, torch AdamW) at the JAX xla row's batch;
3. fine-tuning steps (MAE's ViT-B recipe: erasing, mixup/cutmix, drop path, layer decay) of
   ViT-B/16 and ViT-B/8 (785 tokens), xla vs cudnn;
4. ViT-L/16 with remat; masking setting 3 vs 0 (ViT-B/16 and ViT-B/8); ViT-B/16 without the
   default XLA GPU flags (`semmae_jax.runtime.distributed.GPU_XLA_FLAGS`); ViT-L/16 under torch.compile;
5. ViT-H/14: xla, cudnn, PyTorch.

Every JAX row takes the largest per-device batch up to 512 whose compiled step fits (halving;
XLA's memory estimate is checked before anything runs, and a run that still fails with
RESOURCE_EXHAUSTED is retried in a new process at half the batch). Rows compared with another
(remat, masking, flags) use that row's batch. Times are of `--steps` steps dispatched back to
back after 2 untimed warm-up steps; compile time (lower + compile, per row) is apart.

Model FLOPs are counted analytically, once, for both frameworks, by the counter the training
jobs' logs use (`semmae_jax.flops`): matrix products only, 2 per multiply-add, forward x 3 for
forward + backward; the remat row is charged the same model FLOPs (MFU, not hardware
utilisation). MFU is computed as a job's log computes it (`flops.mfu`, over the device kind's
bf16 datasheet peak from `flops.PEAKS`), and also over the matmul ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from semmae_jax import flops  # noqa: E402 (after the path)
from semmae_jax.runtime.distributed import GPU_XLA_FLAGS, apply_gpu_xla_flags  # noqa: E402

L16, B16, B8, H14 = "mae_vit_large_patch16", "mae_vit_base_patch16", "mae_vit_base_patch8", "mae_vit_huge_patch14"
# The defaults switched off, for the row that measures them (they are all boolean switches).
WITHOUT_DEFAULT_FLAGS = " ".join(flag.split("=")[0] + "=false" for flag in GPU_XLA_FLAGS)


@dataclasses.dataclass(frozen=True)
class Row:
    """One measurement. `vs`: rows whose images/s this row's is divided by (JAX/PyTorch, cudnn/xla, ...)."""

    name: str
    kind: str  # ceilings | pretrain | finetune | torch
    model: str = ""
    attention: str = "xla"
    setting: int = 0
    remat: bool = False
    compile: bool = False  # torch.compile (torch rows)
    xla_flags: str = ""  # appended to XLA_FLAGS in this row's process
    batch_of: str | None = None  # start from the batch that row settled on (same shapes and batch)
    vs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Settings:
    """What differs between the GPU suite and `--smoke` (sizes only; the code paths are the same)."""

    smoke: bool
    max_batch: int
    warmup: int
    steps: int
    matmul_size: int
    copy_bytes: int
    repeats: int
    min_start_s: float  # a row is not started with less budget left than this


def settings_for(args: argparse.Namespace) -> Settings:
    if args.smoke:
        return Settings(True, 8, 1, 2, 256, 2**22, 3, 0.0)
    return Settings(False, 512, 2, args.steps, 8192, 2**31, 20, 20.0)


def pretrain_rows(label: str, model: str, setting: int, extra_vs: tuple[str, ...] = ()) -> list[Row]:
    """JAX xla, JAX cudnn and the PyTorch reference at the xla row's batch."""
    xla, cudnn, torch_row = f"pretrain {label} xla", f"pretrain {label} cudnn", f"torch {label}"
    return [Row(xla, "pretrain", model, setting=setting, vs=(torch_row, *extra_vs)),
            Row(cudnn, "pretrain", model, attention="cudnn", setting=setting, vs=(xla, torch_row, *extra_vs)),
            Row(torch_row, "torch", model, batch_of=xla)]


def plan() -> list[Row]:
    """Every row, in the order of importance."""
    compiled = "torch.compile ViT-L/16"
    rows = [Row("ceilings", "ceilings"), *pretrain_rows("ViT-L/16", L16, 0, (compiled,)),
            *pretrain_rows("ViT-B/16", B16, 0), *pretrain_rows("SemMAE ViT-B/8", B8, 3)]
    for label, model in (("ViT-B/16", "vit_base_patch16"), ("ViT-B/8", "vit_base_patch8")):
        rows += [Row(f"finetune {label} xla", "finetune", model),
                 Row(f"finetune {label} cudnn", "finetune", model, attention="cudnn", vs=(f"finetune {label} xla",))]
    rows += [
        Row("pretrain ViT-L/16 xla remat", "pretrain", L16, remat=True, batch_of="pretrain ViT-L/16 xla",
            vs=("pretrain ViT-L/16 xla",)),
        Row("pretrain ViT-B/16 xla setting 3", "pretrain", B16, setting=3, batch_of="pretrain ViT-B/16 xla",
            vs=("pretrain ViT-B/16 xla",)),
        Row("pretrain SemMAE ViT-B/8 xla setting 0", "pretrain", B8, batch_of="pretrain SemMAE ViT-B/8 xla",
            vs=("pretrain SemMAE ViT-B/8 xla",)),
        Row("pretrain ViT-B/16 xla without default XLA flags", "pretrain", B16, xla_flags=WITHOUT_DEFAULT_FLAGS,
            batch_of="pretrain ViT-B/16 xla", vs=("pretrain ViT-B/16 xla",)),
        Row(compiled, "torch", L16, compile=True, batch_of="pretrain ViT-L/16 xla", vs=("torch ViT-L/16",)),
    ]
    return rows + pretrain_rows("ViT-H/14", H14, 0)


def select(rows: list[Row], pattern: str | None) -> list[Row]:
    """The rows whose names `pattern` (a regular expression) finds, in the plan's order, with what
    they need: the ceilings (MFU is computed from them) and the rows they take their batch from.
    A GPU session too short for the whole suite can measure, say, only `--rows 'cudnn|ViT-H'`."""
    if pattern is None:
        return rows
    try:
        finds = re.compile(pattern).search
    except re.error as error:
        raise SystemExit(f"bench/gpu.py: --rows {pattern!r} is not a regular expression: {error}") from None
    by_name, chosen = {row.name: row for row in rows}, {"ceilings"}
    for row in rows:
        if finds(row.name):
            while row is not None and row.name not in chosen:
                chosen.add(row.name)
                row = by_name.get(row.batch_of) if row.batch_of else None
    if chosen == {"ceilings"}:
        raise SystemExit(f"bench/gpu.py: --rows {pattern!r} names no row; the rows: " + "; ".join(by_name))
    return [row for row in rows if row.name in chosen]


# ---------------------------------------------------------------- one row (child process)


def model_run(row: Row, settings: Settings) -> str:
    """The model a row runs: the named one, or the test model of its family under --smoke."""
    if not settings.smoke or not row.model:
        return row.model
    return "mae_vit_test_patch4" if row.model.startswith("mae_") else "vit_test_patch4"


def measure(row: Row, max_batch: int, settings: Settings) -> dict[str, Any]:
    """Run one row here and now; plain numbers back."""
    model = model_run(row, settings)
    if row.kind == "torch":
        from bench import gpu_torch

        backend = ("eager" if settings.smoke else "inductor") if row.compile else None
        return gpu_torch.train_step(model, max_batch=max_batch, compile_backend=backend, warmup=settings.warmup,
                                    steps=settings.steps)
    from bench import gpu_jax

    if row.kind == "ceilings":
        return {**gpu_jax.describe_device(),
                **gpu_jax.ceilings(settings.matmul_size, settings.copy_bytes, settings.repeats)}
    # cuDNN needs a GPU: under --smoke (CPU) the cudnn rows run the xla path, and say so.
    attention = "xla" if settings.smoke else row.attention
    result = gpu_jax.train_step(row.kind, model, attention=attention, setting=row.setting, remat=row.remat,
                                max_batch=max_batch, warmup=settings.warmup, steps=settings.steps)
    return {**result, "attention_run": attention, "device_kind": gpu_jax.describe_device()["device_kind"]}


def child(specs: list[dict[str, Any]], settings: Settings) -> None:
    """Measure each row, printing one `ROW {json}` line per row; stop after an out-of-memory while
    running (the parent retries it in a fresh process at half the batch)."""
    apply_gpu_xla_flags()  # before JAX starts its backend
    from bench.gpu_jax import OutOfMemory

    for spec in specs:
        row, start = Row(**{**spec["row"], "vs": tuple(spec["row"]["vs"])}), time.perf_counter()
        try:
            result = measure(row, spec["max_batch"], settings)
        except OutOfMemory as error:
            emit({"name": row.name, "retry_below": error.batch})
            return
        except Exception as error:  # one row's failure is that row's result, not the suite's end
            result = {"error": f"{type(error).__name__}: {error}"[:800]}
        emit({"name": row.name, "model_run": model_run(row, settings), **result,
              "wall_s": time.perf_counter() - start, "xla_flags_run": os.environ.get("XLA_FLAGS", ""),
              "tensorflow_imported": "tensorflow" in sys.modules})


def emit(record: dict[str, Any]) -> None:
    print("ROW " + json.dumps(record), flush=True)


# ---------------------------------------------------------------- the schedule (parent process)


def child_env(row: Row, cache_dir: str | None) -> dict[str, str]:
    """The row's process environment: its XLA flags, 90% of the GPU for JAX's pool (its default
    75% would cap the batch), the compilation caches; PyTorch rows keep JAX off the GPU."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), row.xla_flags]))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) / "inductor")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if row.kind == "torch":
        env["JAX_PLATFORMS"] = "cpu"
    return env


def groups(rows: list[Row], settings: Settings) -> list[list[Row]]:
    """One process per row on the GPU; under --smoke one per kind of process (JAX, PyTorch, other
    XLA flags), in order of first appearance, since start-up dominates there."""
    if not settings.smoke:
        return [[row] for row in rows]
    by_env: dict[tuple[bool, str], list[Row]] = {}
    for row in rows:
        by_env.setdefault((row.kind == "torch", row.xla_flags), []).append(row)
    return list(by_env.values())


def launch(group: list[Row], batches: dict[str, int], settings: Settings, cache_dir: str | None,
           timeout_s: float, on_record: Any) -> tuple[bool, list[str]]:
    """Run one child; `on_record(record)` per ROW line. Returns (timed out, the child's last lines)."""
    specs = [{"row": dataclasses.asdict(row), "max_batch": batches[row.name]} for row in group]
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(specs)]
    command += ["--smoke"] if settings.smoke else ["--steps", str(settings.steps)]
    proc = subprocess.Popen(command, cwd=REPO, env=child_env(group[0], cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    tail: collections.deque[str] = collections.deque(maxlen=15)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, list(tail)
        if line is None:
            proc.wait()
            return False, list(tail)
        if line.startswith("ROW "):
            on_record(json.loads(line[4:]))
        else:
            tail.append(line.rstrip())


class Suite:
    """The run: the plan, the results so far, what was skipped; the JSON is rewritten after every row."""

    def __init__(self, rows: list[Row], settings: Settings, args: argparse.Namespace) -> None:
        self.rows, self.settings, self.args = {row.name: row for row in rows}, settings, args
        self.results: dict[str, dict[str, Any]] = {}
        self.skipped: list[str] = []
        self.retry_batch: dict[str, int] = {}
        self.retry_now: set[str] = set()
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s

    def batch_for(self, row: Row) -> int:
        batch = self.results.get(row.batch_of, {}).get("batch", self.settings.max_batch)
        return min(batch, self.retry_batch.get(row.name, batch))

    def record(self, record: dict[str, Any]) -> None:
        name = record.pop("name")
        if "retry_below" in record:
            self.retry_batch[name] = record["retry_below"] // 2
            self.retry_now.add(name)
            print(f"{name}: out of memory at batch {record['retry_below']} while running; retrying at "
                  f"{self.retry_batch[name]} in a new process", flush=True)
            return
        self.results[name] = record
        print(f"[{time.monotonic() - self.start:5.0f} s] {row_line(name, record)}", flush=True)
        self.write()

    def run(self) -> None:
        pending = collections.deque(groups(list(self.rows.values()), self.settings))
        while pending:
            group = [row for row in pending.popleft() if row.name not in self.results]
            left = self.deadline - time.monotonic()
            if group and left < self.settings.min_start_s:
                pending.appendleft(group)
                break
            if not group:
                continue
            timed_out, tail = launch(group, {row.name: self.batch_for(row) for row in group}, self.settings,
                                     self.args.cache_dir, left, self.record)
            unfinished = [row for row in group if row.name not in self.results]
            if timed_out:
                pending.appendleft(unfinished)
                break
            if unfinished and unfinished[0].name in self.retry_now and self.retry_batch[unfinished[0].name] >= 1:
                self.retry_now.discard(unfinished[0].name)
            elif unfinished:
                self.record({"name": unfinished[0].name, "error": "the process ended without a result: "
                             + " | ".join(tail[-4:])})
                unfinished = unfinished[1:]
            if unfinished:
                pending.appendleft(unfinished)
        self.skipped = [row.name for group in pending for row in group if row.name not in self.results]

    def derived(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
        """Model FLOP/s, MFU (as a job's log computes it) and against the measured ceiling, the ratios of `vs`."""
        if "images_per_s" not in result:
            return {}
        ceilings = self.results.get("ceilings", {})
        measured, datasheet = ceilings.get("matmul_tflops"), flops.peak_tflops(ceilings.get("device_kind", ""))
        per_image = train_flops_cached(result["model_run"])
        step_s, step_flops = result["ms_per_step"] / 1000, per_image * result["batch"]
        tflops = step_flops / step_s / 1e12
        ratios = {other: result["images_per_s"] / self.results[other]["images_per_s"]
                  for other in self.rows[name].vs if "images_per_s" in self.results.get(other, {})}
        return {"train_gflop_per_image": per_image / 1e9, "model_tflops": tflops, "peak_tflops": datasheet,
                "mfu": flops.mfu(step_flops, step_s, datasheet, 1) if datasheet else None,
                "mfu_vs_measured": flops.mfu(step_flops, step_s, measured, 1) if measured else None,
                "ratios": ratios}

    def report(self) -> dict[str, Any]:
        rows = [{**dataclasses.asdict(self.rows[name]), **result, **self.derived(name, result)}
                for name, result in sorted(self.results.items(), key=lambda kv: list(self.rows).index(kv[0]))]
        return {"suite": "bench/gpu.py", "argv": sys.argv[1:], "smoke": self.settings.smoke,
                "budget_s": self.args.budget_s, "elapsed_s": time.monotonic() - self.start,
                "cache_dir": self.args.cache_dir, "default_xla_gpu_flags": list(GPU_XLA_FLAGS), "flops": flops.FLOPS_NOTE,
                "rows": rows, "skipped": self.skipped}

    def write(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.report(), indent=1) + "\n")


@functools.cache
def train_flops_cached(model_name: str) -> float:
    from semmae_jax.models import create_model

    return flops.train_flops(create_model(model_name))


def row_line(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{name}: ERROR {r['error']}"
    if "matmul_tflops" in r:
        return (f"{name}: {r['device_kind']}, bf16 {r['matmul_size']}^3 matmul {r['matmul_tflops']:.1f} TFLOP/s, "
                f"copy {r['copy_gbs']:.0f} GB/s")
    return (f"{name}: batch {r['batch']}, {r['images_per_s']:.1f} img/s, {r['ms_per_step']:.1f} ms/step, "
            f"peak {fmt(r['peak_gib'], '.2f')} GiB, compile {r['compile_s']:.1f} s")


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    print("\n| row | model run | batch | img/s | ms/step | model TFLOP/s | MFU (datasheet) | MFU (measured peak) "
          "| peak GiB | compile s | images/s ratios |")
    print("|---" * 11 + "|")
    for r in report["rows"]:
        if "images_per_s" not in r:
            print(f"| {r['name']} | " + (f"ERROR: {r['error'][:120]}" if "error" in r else row_line("", r)[2:])
                  + " |" * 10)
            continue
        ratios = ", ".join(f"{v:.2f}x {k}" for k, v in r["ratios"].items())
        print(f"| {r['name']} | {r['model_run']} | {r['batch']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} "
              f"| {r['model_tflops']:.1f} | {fmt(r['mfu'], '.1%')} | {fmt(r['mfu_vs_measured'], '.1%')} "
              f"| {fmt(r['peak_gib'], '.2f')} | {r['compile_s']:.1f} | {ratios} |")
    if report["skipped"]:
        print(f"\nskipped (budget of {report['budget_s']:.0f} s spent): " + "; ".join(report["skipped"]))
    print(f"\n{len(report['rows'])} rows in {report['elapsed_s']:.0f} s. {report['flops']}.")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/gpu.json", help="JSON with every number (rewritten per row)")
    parser.add_argument("--budget_s", type=float, default=420.0, help="seconds for the whole run; then the running row is stopped, the rest skipped")
    parser.add_argument("--cache_dir", default=None, help="persistent compilation cache (JAX and inductor)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--smoke", action="store_true", help="every code path on CPU with the test models")
    parser.add_argument("--rows", default=None, help="only the rows whose names this regular expression finds "
                        "(with the ceilings and the rows whose batch they take)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    settings = settings_for(args)
    if args.smoke and args.cache_dir is None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        # The smoke rows share a handful of programs (the test models stand in for every model).
        args.cache_dir = str(Path(tempfile.gettempdir()) / "semmae_jax_gpu_smoke_cache")
    if args.child is not None:
        return child(json.loads(args.child), settings)
    suite = Suite(select(plan(), args.rows), settings, args)
    suite.run()
    suite.write()
    print_table(suite.report())
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
