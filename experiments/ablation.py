"""Does semantic masking help? SemMAE's masking ablation, run as a user would run the jobs.

    python experiments/ablation.py --out DIR                 # the measured table (docs/ablation.md)
    python experiments/ablation.py --quick --out DIR         # end to end in minutes (1 seed, 3 cells, tiny budget)

Per cell (a masking strategy: `--setting` 0 random, 1 intra-part, 2 inter-part, 3 adaptive with
`--gamma`; part maps `true` from the dataset or `learned` by stage 1) and per seed, one run is
three of the project's own commands, as subprocesses (`python main.py pretrain`, then
`linprobe` and `finetune` of its encoder), all cells on the same budget (epochs, batch, lr).
A run's figures are the linear probe's and the fine-tune's top-1 at their last epoch (never the
best: that would select on the validation set), the weighted k-NN top-1 of the pretrained encoder
(`main.py knn`, DINO's protocol: nothing trained, so no probe seed noise) and the pretraining
loss of the last epoch. A run recorded before the k-NN column gains it on a rerun (its
pretraining checkpoint is scored; nothing is retrained).

Learned parts (cells `3:G:learned`): stage 1 (`parts train` + `parts export`) on the encoder of
the setting-0 run of seed 0 (plain MAE, the same budget), once, shared by every seed.

Resumable: each finished run is written at once to `DIR/runs/<cell>_seed<S>/result.json` (and
`DIR/results.json`); a rerun skips them, and a job cut short resumes from its own checkpoint.
A rerun may add cells and seeds, but not change what every run shares (data, classes, budget:
`DIR/plan.json`), which would mix incomparable runs in one table: it is refused, naming the field.
Compiled programs are kept in `$JAX_COMPILATION_CACHE_DIR`, else `$SEMMAE_CACHE/jax_cache`
(JAX's persistent cache; default `~/.cache/semmae_jax`), so only the first run of a program pays for compiling it. Outputs: `results.json`, `table.md` (mean ± std over seeds, Welch's t-test
against setting 0, adjusted for the number of comparisons), `ablation.png` (bars with ± std error bars).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from semmae_jax.data.demo import demo_data  # noqa: E402

METRICS = ("linprobe_acc1", "knn_acc1", "finetune_acc1", "final_loss")
ACCURACIES = {"linprobe_acc1": "linear probe", "knn_acc1": "k-NN", "finetune_acc1": "fine-tune"}
SIGNIFICANCE = 0.05  # Welch's t-test p-value under which a difference counts as beyond the spread


@dataclasses.dataclass(frozen=True)
class Cell:
    """One masking strategy: setting, gamma (setting 3 only), part maps ('true', 'learned', 'none')."""

    setting: int
    gamma: float | None = None
    parts: str = "true"

    @classmethod
    def parse(cls, text: str) -> Cell:
        """'0', '1', '2', '3:G' or '3:G:learned'."""
        fields = text.split(":")
        try:
            setting = int(fields[0])
            gamma = float(fields[1]) if setting == 3 else None
        except (ValueError, IndexError):
            raise ValueError(f"--cells: '{text}' is not 0, 1, 2, 3:GAMMA or 3:GAMMA:learned") from None
        parts = fields[2] if len(fields) > 2 else ("none" if setting == 0 else "true")
        if setting not in (0, 1, 2, 3) or parts not in ("true", "learned", "none") or (parts == "none") != (setting == 0):
            raise ValueError(f"--cells: '{text}' is not 0, 1, 2, 3:GAMMA or 3:GAMMA:learned")
        return cls(setting, gamma, parts)

    @property
    def name(self) -> str:
        gamma = f" g{self.gamma:g}" if self.gamma is not None else ""
        return f"s{self.setting}{gamma}" + ("" if self.parts == "none" else f" {self.parts}")

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_")


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every cell gets: models, input size, epochs of each job, batch, step cap."""

    mae_model: str = "mae_vit_demo_patch8"
    vit_model: str = "vit_demo_patch8"
    input_size: int = 64
    batch_size: int = 64
    pretrain_epochs: int = 12
    linprobe_epochs: int = 20
    finetune_epochs: int = 2
    parts_epochs: int = 10
    linprobe_blr: float = 50.0  # LARS base lr: the original's 0.1 is for 90 epochs; 1.0 left the probe near chance here
    steps_per_epoch: int | None = None

    def cap(self) -> list[str]:
        return [] if self.steps_per_epoch is None else ["--steps_per_epoch", str(self.steps_per_epoch)]


QUICK = Budget(mae_model="mae_vit_test_patch4", vit_model="vit_test_patch4", input_size=32, batch_size=16,
               pretrain_epochs=1, linprobe_epochs=1, finetune_epochs=1, parts_epochs=1, steps_per_epoch=2)
DEFAULT_CELLS = "0,1,2,3:1,3:2,3:3,3:2:learned"
QUICK_CELLS = "0,3:2,3:2:learned"  # every code path (random, semantic on true and on learned parts)


# ------------------------------------------------------------------------------- the jobs


def call_main(args: Sequence[str], out_dir: Path, cache: Path) -> None:
    """`python main.py ARGS` from the repo root, its output in `out_dir.out`; a failure names it."""
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "TF_CPP_MIN_LOG_LEVEL": "2", **os.environ}
    console = out_dir.with_suffix(".out")
    console.parent.mkdir(parents=True, exist_ok=True)
    with console.open("w") as stream:
        code = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, stdout=stream,
                              stderr=subprocess.STDOUT).returncode
    if code:
        tail = console.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-3:]
        raise RuntimeError(f"`main.py {' '.join(args[:2])}` failed (exit {code}), see {console}: " + " | ".join(tail))


def log_lines(out_dir: Path) -> list[dict]:
    """The JSON lines of a job's `log.txt` (none yet: [])."""
    path = out_dir / "log.txt"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_epoch_value(out_dir: Path, key: str, epochs: int) -> float | None:
    """`key` of the job's last epoch, or None while that epoch is not logged (the job is not done)."""
    lines = [line for line in log_lines(out_dir) if line.get("epoch") == epochs - 1 and key in line]
    return float(lines[-1][key]) if lines else None


def pretrain(cell: Cell, seed: int, budget: Budget, data: Path, part_path: Path | None, out: Path,
             cache: Path) -> float:
    """The cell's pretraining; its last epoch's `train_loss`."""
    args = ["pretrain", "--config", "demo", "--model", budget.mae_model, "--input_size", str(budget.input_size),
            "--batch_size", str(budget.batch_size), "--epochs", str(budget.pretrain_epochs),
            "--warmup_epochs", str(max(1, budget.pretrain_epochs // 10)), "--setting", str(cell.setting),
            "--data_path", str(data), "--output_dir", str(out), "--seed", str(seed),
            "--save_every", str(budget.pretrain_epochs), "--vis_every", str(budget.pretrain_epochs), *budget.cap()]
    if cell.gamma is not None:
        args += ["--gamma", str(cell.gamma)]
    if part_path is not None:
        args += ["--part_path", str(part_path)]
    return done_or_run(args, out, "train_loss", budget.pretrain_epochs, cache)


def evaluate(job: str, seed: int, budget: Budget, data: Path, classes: int, encoder: Path, out: Path,
             cache: Path) -> float:
    """`linprobe` or `finetune` of the pretrained `encoder`; the last epoch's `test_acc1`."""
    epochs = budget.linprobe_epochs if job == "linprobe" else budget.finetune_epochs
    preset = (["--config", "finetune_demo"] if job == "finetune"
              else ["--batch_size", str(2 * budget.batch_size), "--blr", str(budget.linprobe_blr)])
    args = [job, *preset, "--model", budget.vit_model, "--input_size", str(budget.input_size),
            "--nb_classes", str(classes), "--finetune", str(encoder / "checkpoints"), "--data_path", str(data),
            "--epochs", str(epochs), "--warmup_epochs", str(max(1, epochs // 5)), "--output_dir", str(out),
            "--seed", str(seed), "--save_every", str(epochs), *budget.cap()]
    if job == "finetune":
        args += ["--batch_size", str(budget.batch_size)]
    return done_or_run(args, out, "test_acc1", epochs, cache)


def knn(budget: Budget, data: Path, encoder: Path, out: Path, cache: Path) -> float:
    """`main.py knn` of the pretrained `encoder` (cls token, k 20, T 0.07): its top-1 on the val split."""
    result = out / "knn.json"
    if not result.is_file():
        call_main(["knn", "--checkpoint", str(encoder / "checkpoints"), "--data_path", str(data), "--input_size",
                 str(budget.input_size), "--batch_size", str(budget.batch_size), "--out", str(result)], out, cache)
    return float(json.loads(result.read_text())["acc1"])


def done_or_run(args: list[str], out: Path, key: str, epochs: int, cache: Path) -> float:
    """The job's final `key`, running the job first unless its last epoch is logged already."""
    value = last_epoch_value(out, key, epochs)
    if value is None:
        call_main(args, out, cache)
        value = last_epoch_value(out, key, epochs)
    if value is None or not math.isfinite(value):
        raise RuntimeError(f"{out / 'log.txt'}: no finite '{key}' for epoch {epochs - 1}")
    return value


def learned_part_maps(backbone: Path, budget: Budget, data: Path, out: Path, cache: Path) -> Path:
    """Stage 1 on the plain-MAE encoder `backbone`: the exported part-map tree (made once)."""
    maps = out / "maps"
    if not (out / "exported").is_file():
        if last_epoch_value(out, "train_loss", budget.parts_epochs) is None:
            call_main(["parts", "train", "--config", "parts_demo", "--backbone", str(backbone / "checkpoints"),
                     "--data_path", str(data), "--output_dir", str(out), "--epochs", str(budget.parts_epochs),
                     "--warmup_epochs", "1", "--batch_size", str(budget.batch_size),
                     "--save_every", str(budget.parts_epochs), "--vis_every", str(budget.parts_epochs), *budget.cap()],
                    out, cache)
        call_main(["parts", "export", "--checkpoint", str(out), "--data_path", str(data), "--out", str(maps)],
                out / "export", cache)
        (out / "exported").write_text("done\n")
    return maps


# ------------------------------------------------------------------------------ the runs


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where and on what the ablation runs."""

    out: Path
    data: Path
    part_path: Path
    classes: int
    budget: Budget

    cache: Path


    def run_dir(self, cell: Cell, seed: int) -> Path:
        return self.out / "runs" / f"{cell.slug}_seed{seed}"


def one_run(plan: Plan, cell: Cell, seed: int) -> dict:
    """Pretrain, linear probe, k-NN and fine-tune one (cell, seed): its row of `results.json`."""
    part_path = {"none": None, "true": plan.part_path}.get(cell.parts)
    if cell.parts == "learned":
        mae = plan.run_dir(Cell(0, None, "none"), 0) / "pretrain"
        if last_epoch_value(mae, "train_loss", plan.budget.pretrain_epochs) is None:
            raise ValueError("learned parts need the setting-0 run of seed 0 (add cell 0 and seed 0)")
        part_path = learned_part_maps(mae, plan.budget, plan.data, plan.out / "learned_parts", plan.cache)
    where = plan.run_dir(cell, seed)
    loss = pretrain(cell, seed, plan.budget, plan.data, part_path, where / "pretrain", plan.cache)
    accuracies = {f"{job}_acc1": evaluate(job, seed, plan.budget, plan.data, plan.classes, where / "pretrain",
                                          where / job, plan.cache) for job in ("linprobe", "finetune")}
    accuracies["knn_acc1"] = knn(plan.budget, plan.data, where / "pretrain", where / "knn", plan.cache)
    return {"setting": cell.setting, "gamma": cell.gamma, "parts": cell.parts, "seed": seed, **accuracies,
            "final_loss": loss}


def write_json(path: Path, value: object) -> None:
    """Atomically (a reader never sees half a file)."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(value, indent=1))
    scratch.replace(path)


def run_all(plan: Plan, cells: Sequence[Cell], seeds: int) -> tuple[list[dict], int]:
    """Every (cell, seed), seed-major (so that a cut-short ablation has as many seeds in each cell);
    finished runs are read back, not rerun. Returns (results, runs skipped)."""
    todo = [(cell, seed) for seed in range(seeds) for cell in cells]
    results, skipped, spent, ran = [], 0, 0.0, 0
    for k, (cell, seed) in enumerate(todo):
        record = plan.run_dir(cell, seed) / "result.json"
        if record.is_file():
            result = json.loads(record.read_text())
            if "knn_acc1" not in result:  # finished before the k-NN column: score its pretrained encoder
                where = plan.run_dir(cell, seed)
                result["knn_acc1"] = knn(plan.budget, plan.data, where / "pretrain", where / "knn", plan.cache)
                write_json(record, result)
            results.append(result)
            skipped += 1
            print(f"[{k + 1}/{len(todo)}] {cell.name} seed {seed}: skipped, already done", flush=True)
            continue
        start = time.monotonic()
        result = one_run(plan, cell, seed)
        spent, ran = spent + time.monotonic() - start, ran + 1
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, result)
        results.append(result)
        write_json(plan.out / "results.json", results)
        report(plan, results)
        left = spent / ran * (len(todo) - k - 1 - sum((plan.run_dir(c, s) / "result.json").is_file()
                                                      for c, s in todo[k + 1:]))
        print(f"[{k + 1}/{len(todo)}] {cell.name} seed {seed}: linprobe {result['linprobe_acc1']:.2f} "
              f"k-NN {result['knn_acc1']:.2f} finetune {result['finetune_acc1']:.2f} loss {result['final_loss']:.4f} "
              f"({time.monotonic() - start:.0f} s; about {left / 60:.1f} min left)", flush=True)
    write_json(plan.out / "results.json", results)
    return results, skipped


# --------------------------------------------------------------------------- the report


def cell_of(result: dict) -> Cell:
    return Cell(result["setting"], result["gamma"], result["parts"])


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p of Welch's t-test, None with fewer than 2 seeds on a side or no spread at all."""
    from scipy import stats

    if min(len(a), len(b)) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary(results: Sequence[dict]) -> dict[Cell, dict[str, list[float]]]:
    """Cell -> metric -> the seeds' values, cells in first-seen order."""
    cells: dict[Cell, dict[str, list[float]]] = {}
    for result in results:
        per_metric = cells.setdefault(cell_of(result), {m: [] for m in METRICS})
        for metric in METRICS:
            per_metric[metric].append(result[metric])
    return cells


def table(results: Sequence[dict]) -> str:
    """Markdown: mean ± std per cell and metric, the difference to setting 0, its Welch p and, for
    the accuracies, that p adjusted for the number of comparisons in the table (Benjamini-Hochberg)."""
    cells = summary(results)
    baseline = cells.get(Cell(0, None, "none"))
    raw = {(cell, metric): welch_p(values[metric], baseline[metric])
           for cell, values in cells.items() for metric in METRICS
           if baseline is not None and cell.setting != 0}  # fmt: skip
    adjusted = adjusted_p({key: p for key, p in raw.items() if p is not None and key[1] != "final_loss"})
    lines = ["| cell | setting | gamma | parts | seeds | "
             + " | ".join(f"{title} top-1 (%)" for title in ACCURACIES.values()) + " | final pretraining loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell, values in cells.items():
        shown = []
        for metric in METRICS:
            mean, std = mean_std(values[metric])
            text = f"{mean:.2f} ± {std:.2f}" if metric != "final_loss" else f"{mean:.4f} ± {std:.4f}"
            if baseline is not None and cell.setting != 0:
                diff = mean - statistics.fmean(baseline[metric])
                p = raw[cell, metric]
                mark = "n/a" if p is None else f"p={p:.2f}"
                if (cell, metric) in adjusted:
                    q = adjusted[cell, metric]
                    mark += f", adj. {q:.2f}" + (" **beyond the spread**" if q < SIGNIFICANCE else "")
                text += f" ({diff:+.2f}, {mark})" if metric != "final_loss" else f" ({diff:+.4f}, {mark})"
            shown.append(text)
        gamma = "" if cell.gamma is None else f"{cell.gamma:g}"
        lines.append(f"| {cell.name} | {cell.setting} | {gamma} | {cell.parts} | {len(values[METRICS[0]])} | "
                     + " | ".join(shown) + " |")
    lines += ["", f"Mean ± standard deviation over seeds. In brackets: the difference to setting 0 (random masking), "
                  f"the two-sided p of Welch's t-test against it and, for the accuracies, that p adjusted for the "
                  f"{len(adjusted)} accuracy comparisons of this table (Benjamini-Hochberg: with many cells some raw "
                  f"p fall under {SIGNIFICANCE} by chance); **beyond the spread** when the adjusted p < {SIGNIFICANCE} "
                  "(n/a: fewer than 2 seeds). The pretraining loss is not comparable across settings (each masks "
                  "differently, so each reconstructs a different task); it is shown as a check that every run trained."]
    return "\n".join(lines) + "\n"


def adjusted_p(raw: dict) -> dict:
    """The p-values of `raw` adjusted for their number (scipy's Benjamini-Hochberg)."""
    from scipy import stats

    if not raw:
        return {}
    return dict(zip(raw, (float(q) for q in stats.false_discovery_control(list(raw.values()))), strict=True))


def chart(results: Sequence[dict], path: Path, chance: float) -> None:
    """Bars of the three accuracies per cell, error bars ± one standard deviation over seeds, and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary(results)
    names = [cell.name for cell in cells]
    figure, axes = plt.subplots(1, len(ACCURACIES), figsize=(max(9.0, 1.6 * len(names) + 3), 3.6), dpi=90)
    for axis, (metric, title) in zip(axes, ACCURACIES.items(), strict=True):
        stats = [mean_std(values[metric]) for values in cells.values()]
        axis.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
                 color=["#888888" if c.setting == 0 else "#3b75af" for c in cells])
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("top-1 (%)")
        axis.set_title(f"{title} (mean ± std over seeds)", fontsize=9)
        axis.axhline(chance, color="#aa3333", linestyle="--", linewidth=1, label="chance")
        axis.set_ylim(0.0, min(100.0, max(chance, *(m + s for m, s in stats)) + 5))
        axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def report(plan: Plan, results: Sequence[dict]) -> None:
    """`table.md` and `ablation.png` of the runs so far (rewritten after each run)."""
    (plan.out / "table.md").write_text(table(results))
    chart(results, plan.out / "ablation.png", chance=100.0 / plan.classes)


# --------------------------------------------------------------------------------- main


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python experiments/ablation.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (resumed when it holds a run already)")
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny models and a 2-step budget: end to end")
    parser.add_argument("--cells", default=None, help=f"comma-separated cells (default {DEFAULT_CELLS}; --quick: {QUICK_CELLS})")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; --quick 1)")
    parser.add_argument("--data_path", help="image folder with train/ and val/ (default: the grown demo data)")
    parser.add_argument("--part_path", help="its part maps (default: DATA/parts)")
    parser.add_argument("--num_images", type=int, default=1024, help="grown demo data: training images")
    parser.add_argument("--classes", type=int, default=4, help="grown demo data: classes (up to 8)")
    for name, value in dataclasses.asdict(Budget()).items():
        if name not in ("mae_model", "vit_model", "steps_per_epoch"):
            parser.add_argument(f"--{name}", type=type(value), default=None, help=f"default {value} (--quick: {getattr(QUICK, name)})")
    parser.add_argument("--steps_per_epoch", type=int, default=None, help="cap on every job's epoch (--quick: 2)")
    parser.add_argument("--mae_model", default=None, help="pretraining model (default mae_vit_demo_patch8)")
    parser.add_argument("--vit_model", default=None, help="its classifier (default vit_demo_patch8)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else Budget()
    budget = dataclasses.replace(base, **{name: getattr(args, name) for name in dataclasses.asdict(base)
                                          if getattr(args, name) is not None})
    if args.data_path:
        data = Path(args.data_path)
        classes = len([p for p in (data / "train").iterdir() if p.is_dir()]) if (data / "train").is_dir() else 0
        if not classes:
            raise ValueError(f"--data_path {data}: no class folders under train/")
    else:
        data, classes = demo_data(num_images=args.num_images, classes=args.classes), args.classes
    part_path = Path(args.part_path) if args.part_path else data / "parts"
    cache = Path(os.environ.get("SEMMAE_CACHE") or "~/.cache/semmae_jax").expanduser() / "jax_cache"
    return Plan(Path(args.out).resolve(), data.resolve(), part_path.resolve(), classes, budget, cache.resolve())


def check_same_plan(path: Path, shared: dict) -> None:
    """Refuse to resume `path`'s ablation with other data, classes or budget (cells and seeds may grow)."""
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    flat_saved = {**{k: v for k, v in saved.items() if k != "budget"}, **saved.get("budget", {})}
    flat_new = {**{k: v for k, v in shared.items() if k != "budget"}, **shared["budget"]}
    changed = [f"{k} {flat_saved.get(k)!r} -> {v!r}" for k, v in flat_new.items() if flat_saved.get(k) != v]
    if changed:
        raise ValueError(f"{path.parent} holds an ablation of another plan ({'; '.join(changed)}): its runs "
                         "would not be comparable; use a new --out, or the same flags")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    try:
        plan = make_plan(args)
        cells = [Cell.parse(text) for text in (args.cells or (QUICK_CELLS if args.quick else DEFAULT_CELLS)).split(",")]
    except ValueError as error:
        sys.exit(f"ablation.py: error: {error}")
    seeds = args.seeds or (1 if args.quick else 3)
    plan.out.mkdir(parents=True, exist_ok=True)
    shared = {"data": str(plan.data), "part_path": str(plan.part_path), "classes": plan.classes,
              "budget": dataclasses.asdict(plan.budget)}
    try:
        check_same_plan(plan.out / "plan.json", shared)
    except ValueError as error:
        sys.exit(f"ablation.py: error: {error}")
    write_json(plan.out / "plan.json", {**shared, "seeds": seeds, "cells": [c.name for c in cells]})
    start = time.monotonic()
    results, skipped = run_all(plan, cells, seeds)
    report(plan, results)
    print(f"{len(results)} runs ({skipped} skipped, already done) in {time.monotonic() - start:.0f} s; "
          f"{plan.out / 'table.md'}, {plan.out / 'ablation.png'}")


if __name__ == "__main__":
    main()
