"""A damaged array file of a run's latest step: the rerun sets the step aside in one line and resumes
from the previous one, with no traceback, whichever file is damaged and however far orbax's reads got.

In processes of their own (`python main.py pretrain`): the reads orbax abandons after the first
failure report late, from other threads or at exit, and only a real stderr shows all of it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tensorstore as ts

from semmae_jax.checkpoint import integrity
from semmae_jax.checkpoint.integrity import failure_reason

ROOT = Path(__file__).parents[1]
RUN = ["--model", "mae_vit_test_patch4", "--input_size", "32", "--batch_size", "2", "--steps_per_epoch", "2",
       "--num_workers", "2", "--log_every", "1", "--vis_every", "100", "--warmup_epochs", "0", "--epochs", "2",
       "--save_every_steps", "1", "--keep_checkpoints", "5", "--seed", "5"]
LATEST, PREVIOUS = 4, 3
NOISE = ("Traceback", "Exception ignored", "<bound method", "object at 0x", "Event loop is closed",
         "Task exception was never retrieved", "Task was destroyed")


def pretrain(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", "pretrain", *RUN, "--output_dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=600)


@pytest.fixture(scope="module")
def finished_run(demo_root, tmp_path_factory) -> Path:
    """One short run (steps 1..4 kept), copied by each case that damages it."""
    out = tmp_path_factory.mktemp("damage") / "run"
    run = pretrain(out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [1, 2, 3, LATEST]
    return out


def read_spans(item_dir: Path) -> dict[Path, tuple[int, int]]:
    """{data file: (first, end) of the bytes the item's arrays are read from}, from the OCDBT database's
    latest version (`tensorstore.ocdbt.dump`). The database also holds bytes that version does not point
    at (each process's own b-tree nodes, tails of data files), whose damage no read meets."""
    base = ts.KvStore.open(f"file://{item_dir}/").result()
    manifest = ts.ocdbt.dump(base).result()
    root = ts.ocdbt.dump(base, manifest["versions"][-1]["root"]["location"]).result()
    assert root["height"] == 0, "a b-tree of one node (the tiny model's): every entry a value"
    spans: dict[Path, tuple[int, int]] = {}
    for entry in root["entries"]:
        if "indirect_value" in entry:  # "value:<base path>:<file>:<offset>:<length>"; small values are inline
            _, base_path, file, offset, length = entry["indirect_value"].split(":")
            first, end = spans.get(item_dir / base_path / file, (int(offset), 0))
            spans[item_dir / base_path / file] = (min(first, int(offset)), max(end, int(offset) + int(length)))
    return spans


@pytest.mark.slow
@pytest.mark.parametrize(("item", "which"), [("params", "largest"), ("opt_state", "smallest")])  # both items, both ends
def test_a_truncated_array_file_falls_back_in_one_line_without_traceback(item, which, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    spans = read_spans(out / "checkpoints" / str(LATEST) / item)
    files = sorted(spans, key=lambda path: path.stat().st_size)  # as tensorstore flushed them: one may be both
    victim = files[-1] if which == "largest" else files[0]
    first, end = spans[victim]
    os.truncate(victim, (first + end) // 2)  # halfway through what is read of it
    run = pretrain(out)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = (run.stdout + run.stderr).splitlines()
    named = [line for line in printed if re.search(rf"\bstep {LATEST}\b.*damaged", line)]
    assert len(named) == 1, named
    assert re.fullmatch(rf"checkpoint step {LATEST}: \S.* in \S+: damaged, moved to {LATEST}\.damaged; trying the "
                        "previous one", named[0]), named[0]
    assert f"resuming this run from its checkpoint at step {PREVIOUS}" in run.stdout
    for noise in NOISE:
        assert noise not in run.stderr and noise not in named[0], noise
    assert (out / "checkpoints" / f"{LATEST}.damaged").is_dir() and (out / "checkpoints" / str(LATEST)).is_dir()


def test_the_reason_is_the_librarys_own_line_without_object_reprs():
    """Orbax wraps tensorstore's error in one that ends in a multi-line `<bound method ...spec of TensorStore({`."""
    cause = ValueError('OUT_OF_RANGE: Error reading "pos_embed/0.0.0" in OCDBT database: byte range [1, 9) is not valid')
    wrapper = Exception("Encountered error while reading array index: (slice(0, 1, 1),). See full TensorStore details: "
                        "<bound method pybind11_detail_function_record.spec of TensorStore({\n  'driver': 'zarr',\n})>.")
    wrapper.__cause__ = cause
    assert failure_reason(wrapper) == str(cause)
    assert failure_reason(Exception(str(wrapper))) == ("Encountered error while reading array index: (slice(0, 1, 1),). "
                                                      "See full TensorStore details:")


def failing_coroutine(filename: str):
    """A coroutine function whose code claims to live in `filename` (asyncio's record names that file)."""
    namespace: dict = {}
    exec(compile("async def read():\n    raise ValueError('OUT_OF_RANGE: byte range not valid')\n", filename, "exec"),
         namespace)
    return namespace["read"]


def abandon_failed_task(read) -> None:
    """Run `read` as a task that fails, never look at its exception, and collect it (asyncio then logs it)."""
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(read())
        loop.run_until_complete(asyncio.sleep(0.01))
        del task
        gc.collect()
    finally:
        loop.close()


def test_an_orbax_read_task_abandoned_before_the_failure_is_caught_logs_nothing_and_others_still_log(caplog):
    """A failed read task can be collected while orbax is still unwinding, before `reading`'s except clause."""
    orbax_read = failing_coroutine(integrity._ORBAX + "serialization.py")
    own_read = failing_coroutine(__file__)
    with (caplog.at_level(logging.ERROR, logger="asyncio"), pytest.raises(integrity.CheckpointDamaged),
          integrity.reading("checkpoint step 4")):
        abandon_failed_task(orbax_read)
        abandon_failed_task(own_read)
        raise ValueError("OUT_OF_RANGE: Error reading")
    never_retrieved = [r.getMessage() for r in caplog.records if "Task exception was never retrieved" in r.getMessage()]
    assert len(never_retrieved) == 1 and __file__ in never_retrieved[0], never_retrieved
