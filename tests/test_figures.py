"""bench/figures.py: the manual's plots can be redrawn from what the runs wrote."""

from __future__ import annotations

import json
from pathlib import Path

from bench import figures

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def test_memory_rows_read_every_row_of_the_benchmarks_table() -> None:
    rows = figures.memory_rows((ROOT / "docs" / "benchmarks.md").read_text())
    assert [(model, devices) for model, devices, *_ in rows] == [
        (model, devices) for model in ("ViT-B/16 MAE", "ViT-L/16 MAE", "ViT-H/14 MAE") for devices in (8, 64, 256)]
    assert all(state <= total for _, _, *gib in rows for state, total in (gib[:2], gib[2:]))


def test_loss_and_memory_figures_are_pngs(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / (e + 1), "train_alpha": e / 3}) + "\n"
                           for e in range(3)) + json.dumps({"goodput": {"wall_s": 9.0}, "step": 3}) + "\n")
    table = tmp_path / "t.md"
    table.write_text("| ViT-B/16 MAE | 8 | 1.54 / 84.86 | 0.45 / 83.77 |\n| ViT-B/16 MAE | 64 | 1.28 / 11.72 | 0.06 / 10.49 |\n")
    figures.main(["loss", "--log", str(log), "--out", str(tmp_path / "loss.png")])
    figures.main(["memory", "--table", str(table), "--out", str(tmp_path / "memory.png")])
    assert (tmp_path / "loss.png").read_bytes()[:8] == (tmp_path / "memory.png").read_bytes()[:8] == PNG
