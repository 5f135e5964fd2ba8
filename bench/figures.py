"""The manual's plots, drawn from what the runs wrote, so that each can be redrawn by one command.

    python bench/figures.py loss --log output_demo/log.txt --out docs/demo_loss.png
    python bench/figures.py memory --table docs/benchmarks.md --out docs/memory.png

`loss`: a pretraining run's `log.txt` (one JSON line per epoch) -> the epoch loss and the
masking alpha against the epoch. `memory`: the memory table of docs/benchmarks.md (the
output of `python bench/memory.py`, pasted there) -> GiB per device against the device
count, data-parallel vs FSDP, one line per model. Reading the pasted table keeps the plot
and the table the same numbers without recompiling every step (minutes per model).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

MEMORY_ROW = re.compile(r"^\| (\S[^|]*?) \| (\d+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) \|$")


def _pyplot() -> Any:
    """matplotlib's pyplot, imported only when a figure is drawn, off screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_figure(log: Path, out: Path) -> None:
    """Epoch loss (left axis) and alpha (right axis) of a `log.txt`."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "epoch" in r]  # the goodput records (one per part of the run) have none
    epochs = [r["epoch"] + 1 for r in rows]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(epochs, [r["train_loss"] for r in rows], marker="o", markersize=3, label="train_loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (norm_pix_loss)")
    if "train_alpha" in rows[0]:
        alpha = ax.twinx()
        alpha.plot(epochs, [r["train_alpha"] for r in rows], color="tab:orange", linestyle="--", label="alpha")
        alpha.set_ylabel("masking alpha", color="tab:orange")
    ax.set_title(f"{log.parent.name}: loss {rows[0]['train_loss']:.3f} -> {rows[-1]['train_loss']:.3f}")
    fig.tight_layout()
    fig.savefig(out)


def memory_rows(table: str) -> list[tuple[str, int, float, float, float, float]]:
    """(model, devices, dp state, dp total, fsdp state, fsdp total) of each memory-table row."""
    return [(m[1], int(m[2]), *map(float, m.groups()[2:])) for line in table.splitlines()
            if (m := MEMORY_ROW.match(line.strip()))]


def memory_figure(table: Path, out: Path) -> None:
    """Total GiB per device (solid: data-parallel, dashed: FSDP) against the device count."""
    rows = memory_rows(table.read_text())
    if not rows:
        raise SystemExit(f"figures.py: error: no memory-table rows (| model | devices | a / b | c / d |) in {table}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for i, model in enumerate(dict.fromkeys(r[0] for r in rows)):
        mine = [r for r in rows if r[0] == model]
        devices = [r[1] for r in mine]
        ax.plot(devices, [r[3] for r in mine], color=f"C{i}", marker="o", label=f"{model}, data-parallel")
        ax.plot(devices, [r[5] for r in mine], color=f"C{i}", marker="s", linestyle="--", label=f"{model}, FSDP")
    ax.axhline(80, color="grey", linewidth=0.8, linestyle=":")
    ax.text(devices[0], 82, "80 GiB", color="grey", fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="devices", ylabel="GiB per device (total)")
    ax.set_xticks(devices, [str(d) for d in devices])
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    figures = parser.add_subparsers(dest="figure", required=True)
    loss = figures.add_parser("loss", help="a pretraining log.txt -> loss and alpha per epoch")
    loss.add_argument("--log", dest="source", type=Path, required=True)
    loss.set_defaults(draw=loss_figure)
    loss.add_argument("--out", type=Path, required=True)
    memory = figures.add_parser("memory", help="the memory table of a markdown page -> GiB per device")
    memory.add_argument("--table", dest="source", type=Path, required=True)
    memory.set_defaults(draw=memory_figure)
    memory.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.draw(args.source, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
