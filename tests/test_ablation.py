"""experiments/ablation.py end to end on the smallest budget, the table's rule, and the grown demo data."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import ablation
from semmae_jax.data import demo

ROOT = Path(__file__).resolve().parent.parent


def run_harness(out: Path) -> str:
    command = [sys.executable, "experiments/ablation.py", "--quick", "--out", str(out), "--cells", "0,3:2:learned",
               "--num_images", "64", "--classes", "4"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the jobs see 1 device, as a user's
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_quick_ablation_runs_every_cell_once_and_reports(tmp_path):
    out = tmp_path / "ablation"
    first = run_harness(out)
    results = json.loads((out / "results.json").read_text())
    cells = {(r["setting"], r["gamma"], r["parts"]) for r in results}
    assert cells == {(0, None, "none"), (3, 2.0, "learned")} and len(results) == 2
    for result in results:
        assert set(result) == {"setting", "gamma", "parts", "seed", "linprobe_acc1", "knn_acc1", "finetune_acc1",
                               "final_loss"}
        assert all(0 <= result[k] <= 100 for k in ("linprobe_acc1", "knn_acc1", "finetune_acc1"))
        slug = "s0" if result["setting"] == 0 else "s3_g2_learned"
        knn = json.loads((out / "runs" / f"{slug}_seed0" / "knn" / "knn.json").read_text())
        assert knn["acc1"] == result["knn_acc1"] and knn["count"] == 16 and knn["k"] == 20  # the val split, once
        assert math.isfinite(result["final_loss"]) and result["final_loss"] > 0
    # the learned cell trained on stage 1's exported maps, one per training image
    assert len(list((out / "learned_parts" / "maps").rglob("*.png"))) == 64
    table = (out / "table.md").read_text()
    assert table.count("\n| s") == 2 and "s3 g2 learned" in table and "| k-NN top-1 (%) |" in table
    learned = next(row for row in table.splitlines() if row.startswith("| s3 g2 learned"))
    assert f"| {results[1]['knn_acc1']:.2f} ± 0.00 (" in learned
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[2/2]" in first and "0 skipped" in first
    second = run_harness(out)  # resumed: nothing reruns
    assert second.count(": skipped, already done") == 2 and "2 runs (2 skipped" in second
    assert json.loads((out / "results.json").read_text()) == results


def rows(values: dict) -> list[dict]:
    return [{"setting": s, "gamma": g, "parts": p, "seed": k, "linprobe_acc1": v, "finetune_acc1": v,
             "knn_acc1": v, "final_loss": 1.0} for (s, g, p), seeds in values.items() for k, v in enumerate(seeds)]


def test_table_marks_only_differences_beyond_the_spread():
    clear = ablation.table(rows({(0, None, "none"): [40.0, 41.0, 39.0], (1, None, "true"): [60.0, 61.0, 59.5]}))
    noisy = ablation.table(rows({(0, None, "none"): [40.0, 50.0, 30.0], (1, None, "true"): [45.0, 30.0, 52.0]}))
    assert "| s1 true | 1 |  | true | 3 | 60.17 ± 0.76 (+20.17, p=0.00, adj. 0.00 **beyond the spread**)" in clear
    assert "beyond the spread**" not in noisy.split("\n\n")[0] and "(+2.33, p=0.8" in noisy


def test_a_raw_p_under_the_threshold_among_many_cells_is_not_called_beyond_the_spread():
    """Six cells like the baseline and one that differs a little: its raw p is under 0.05, but with
    18 accuracy comparisons in the table that is what chance gives (Benjamini-Hochberg)."""
    values = {(0, None, "none"): [40.0, 42.0, 38.0], (1, None, "true"): [45.0, 44.0, 46.5]}
    values |= {(3, float(g), "true"): [40.5, 41.5, 38.5] for g in range(1, 6)}
    table = ablation.table(rows(values))
    line = next(row for row in table.splitlines() if row.startswith("| s1 true"))
    raw = float(line.split("p=")[1].split(",")[0])
    assert raw < 0.05 and "beyond the spread" not in table.split("\n\n")[0] and "18 accuracy comparisons" in table


def test_cells_parse_and_bad_ones_are_named():
    assert ablation.Cell.parse("3:2:learned") == ablation.Cell(3, 2.0, "learned")
    assert ablation.Cell.parse("0") == ablation.Cell(0, None, "none")
    for bad in ("4", "3", "0:1:learned", "1:1:guessed"):
        with pytest.raises(ValueError, match=f"'{bad}'"):
            ablation.Cell.parse(bad)


def test_grown_demo_data_is_deterministic_and_cached_in_its_own_folder(tmp_path):
    root = demo.demo_data(tmp_path / "a", num_images=64, classes=8)
    again = demo.demo_data(tmp_path / "b", num_images=64, classes=8)
    assert root.name == "demo-shapes-v1-8c-64" and not (tmp_path / "a" / "demo-v1").exists()
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["classes"] == list(demo.ALL_BODY_PLANS) and meta["images_per_class"] == {"train": 8, "val": 2}
    assert len(list((root / "train").rglob("*.jpg"))) == 64 and len(list((root / "parts" / "val").rglob("*.png"))) == 16
    with pytest.raises(ValueError, match="--num_images"):
        demo.demo_data(tmp_path, num_images=50, classes=8)


def test_grown_classes_differ_by_shape_not_by_texture():
    """Torso textures are drawn at random (not a class cue), yet part-area proportions still
    separate the 8 classes well above chance (0.125) by nearest centroid."""
    import numpy as np

    def sample(seed, count):
        for class_id, name in enumerate(demo.ALL_BODY_PLANS):
            for k in range(count):
                labels = demo.render(name, np.random.default_rng([seed, class_id, k]), "smooth")[1]
                areas = np.bincount(labels.ravel(), minlength=len(demo.PART_NAMES))[1:].astype(float)
                yield class_id, areas / areas.sum()

    train, test = list(sample(1, 15)), list(sample(2, 8))
    centroids = np.array([np.mean([f for c, f in train if c == k], axis=0) for k in range(8)])
    accuracy = np.mean([np.linalg.norm(centroids - f, axis=1).argmin() == c for c, f in test])
    assert 0.5 < accuracy < 1.0  # learnable, but not trivially so


def test_resuming_with_another_budget_is_refused_naming_the_field(tmp_path):
    """A rerun into the same --out with other shared flags would mix incomparable runs in one table."""
    data, out = tmp_path / "data", tmp_path / "ablation"
    for name in ("a", "b"):
        (data / "train" / name).mkdir(parents=True)
    flags = ["--quick", "--out", str(out), "--data_path", str(data), "--cells", "0"]
    plan = ablation.make_plan(ablation.parse(flags))
    shared = {"data": str(plan.data), "part_path": str(plan.part_path), "classes": 2,
              "budget": ablation.dataclasses.asdict(plan.budget)}
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({**shared, "seeds": 1, "cells": ["s0"]}))
    ablation.check_same_plan(out / "plan.json", shared)  # the same plan (more cells or seeds): resumed
    with pytest.raises(SystemExit, match=r"holds an ablation of another plan \(pretrain_epochs 1 -> 3\).*new --out"):
        ablation.main([*flags, "--pretrain_epochs", "3"])
    assert json.loads((out / "plan.json").read_text())["budget"]["pretrain_epochs"] == 1  # left as it was
