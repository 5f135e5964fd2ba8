"""bench/gpu.py cannot rot between GPU runs: `--smoke` runs every row's code path on CPU with the
test models, and what a GPU run leans on without being checkable there (the batch search, the
FLOP count behind MFU, in tests/test_flops.py) is checked against independent counts."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import gpu, gpu_jax  # noqa: E402


def numbers_in(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from numbers_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from numbers_in(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_smoke_runs_every_row_with_finite_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--budget_s", "1500", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [row.name for row in gpu.plan()] and report["skipped"] == []
    for name, r in rows.items():
        assert "error" not in r, (name, r["error"])
        assert not r["tensorflow_imported"], name
        assert all(math.isfinite(x) for x in numbers_in(r)), name
        if r["kind"] != "ceilings":
            assert r["images_per_s"] > 0 and r["peak_gib"] > 0 and r["model_tflops"] > 0, name
            assert r["mfu_vs_measured"] > 0 and set(r["ratios"]) == set(r["vs"]), name
    assert rows["ceilings"]["matmul_tflops"] > 0 and rows["ceilings"]["copy_gbs"] > 0
    assert gpu.WITHOUT_DEFAULT_FLAGS in rows["pretrain ViT-B/16 xla without default XLA flags"]["xla_flags_run"]
    assert rows["torch ViT-L/16"]["batch"] == rows["pretrain ViT-L/16 xla"]["batch"]
    assert rows["torch.compile ViT-L/16"]["torch_compile"] == "eager"
    assert "| pretrain ViT-H/14 cudnn | mae_vit_test_patch4 | 8 |" in proc.stdout  # the table, printed last


class FakeCompiled:
    """XLA's memory analysis of a step whose temporaries grow by 100 bytes an image."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def memory_analysis(self):
        return SimpleNamespace(argument_size_in_bytes=1000, output_size_in_bytes=1000,
                               temp_size_in_bytes=100 * self.batch, alias_size_in_bytes=1000)


def test_batch_search_jumps_to_the_largest_halving_that_fits():
    tried = []

    def compile_at(batch):
        tried.append(batch)
        return FakeCompiled(batch)

    batch, compiled, _, tries = gpu_jax.fit_batch(compile_at, 512, limit=1000 + 100 * 100)
    assert (batch, compiled.batch, tries, tried) == (64, 64, 2, [512, 64])
    assert gpu_jax.fit_batch(compile_at, 512, limit=None)[0] == 512


def test_batch_search_halves_on_out_of_memory_at_compile_time_and_raises_other_errors():
    def compile_at(batch):
        if batch > 128:
            raise jax.errors.JaxRuntimeError(f"RESOURCE_EXHAUSTED: Out of memory allocating {batch} images")
        return FakeCompiled(batch)

    assert gpu_jax.fit_batch(compile_at, 512, limit=None)[::3] == (128, 3)

    def broken(batch):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        gpu_jax.fit_batch(broken, 512, limit=None)
    with pytest.raises(RuntimeError, match="not even a batch of 1"):
        gpu_jax.fit_batch(compile_at, 512, limit=10)


def test_plan_orders_rows_by_importance_and_refers_only_to_earlier_rows():
    rows = gpu.plan()
    names = [row.name for row in rows]
    assert names[:4] == ["ceilings", "pretrain ViT-L/16 xla", "pretrain ViT-L/16 cudnn", "torch ViT-L/16"]
    assert names[-3:] == ["pretrain ViT-H/14 xla", "pretrain ViT-H/14 cudnn", "torch ViT-H/14"]
    for i, row in enumerate(rows):
        assert row.batch_of is None or row.batch_of in names[:i], row.name
        assert set(row.vs) <= set(names), row.name
    assert len(set(names)) == len(names)
    assert np.all([row.model for row in rows[1:]])


def suite_with(rows, launches, budget_s=100.0):
    """A Suite over `rows` whose child processes are `launches`: one function per start, called with
    (batches, on_record) and returning whether the budget ran out."""
    calls = []

    def fake_launch(group, batches, settings, cache_dir, timeout_s, on_record):
        calls.append(dict(batches))
        return launches[len(calls) - 1](batches, on_record), ["last line of the child"]

    args = SimpleNamespace(budget_s=budget_s, cache_dir=None, out="unused.json")
    settings = gpu.Settings(False, 512, 1, 1, 8, 8, 1, 0.0)
    suite = gpu.Suite(rows, settings, args)
    suite.write = lambda: None
    return suite, calls, fake_launch


def result(batch):
    return {"batch": batch, "images_per_s": 10.0, "ms_per_step": 1.0, "compile_s": 1.0, "peak_gib": 1.0,
            "model_run": "mae_vit_test_patch4"}


def test_out_of_memory_while_running_is_retried_in_a_new_process_at_half_the_batch(monkeypatch):
    rows = [gpu.Row("a", "pretrain", "mae_vit_test_patch4"),
            gpu.Row("b", "torch", "mae_vit_test_patch4", batch_of="a", vs=("a",))]
    launches = [lambda batches, rec: rec({"name": "a", "retry_below": 512}) and False,
                lambda batches, rec: rec({"name": "a", **result(batches["a"])}) and False,
                lambda batches, rec: rec({"name": "b", **result(batches["b"])}) and False]
    suite, calls, fake = suite_with(rows, launches)
    monkeypatch.setattr(gpu, "launch", fake)
    suite.run()
    assert calls == [{"a": 512}, {"a": 256}, {"b": 256}]  # b starts from the batch a settled on
    assert suite.results["a"]["batch"] == 256 and suite.skipped == []
    assert suite.derived("b", suite.results["b"])["ratios"] == {"a": 1.0}


def test_a_process_that_dies_is_that_rows_error_and_a_spent_budget_skips_the_rest(monkeypatch):
    rows = [gpu.Row(name, "pretrain", "mae_vit_test_patch4") for name in "abc"]
    launches = [lambda batches, rec: False, lambda batches, rec: True]  # a: dies; b: the budget runs out
    suite, calls, fake = suite_with(rows, launches)
    monkeypatch.setattr(gpu, "launch", fake)
    suite.run()
    assert "the process ended without a result: last line of the child" in suite.results["a"]["error"]
    assert suite.skipped == ["b", "c"] and len(calls) == 2


def test_rows_selects_by_name_with_the_ceilings_and_the_rows_whose_batch_they_take():
    rows = gpu.plan()

    def names(pattern):
        return [row.name for row in gpu.select(rows, pattern)]

    assert names("remat") == ["ceilings", "pretrain ViT-L/16 xla", "pretrain ViT-L/16 xla remat"]
    assert names("setting 0$|torch.compile") == ["ceilings", "pretrain ViT-L/16 xla", "pretrain SemMAE ViT-B/8 xla",
                                                 "pretrain SemMAE ViT-B/8 xla setting 0", "torch.compile ViT-L/16"]
    assert names("cudnn") == ["ceilings"] + [row.name for row in rows if row.attention == "cudnn"]
    assert gpu.select(rows, None) == rows
    with pytest.raises(SystemExit, match=r"--rows 'ViT-Z' names no row; the rows: ceilings; pretrain ViT-L/16 xla;"):
        gpu.select(rows, "ViT-Z")
    with pytest.raises(SystemExit, match=r"--rows 'ViT-\[' is not a regular expression: unterminated"):
        gpu.select(rows, "ViT-[")
