"""Long runs meet faults: divergence, damaged checkpoints, a second writer, a full disk, bad flags,
an epoch cut by a preemption. Each case behaves as docs/failures.md says."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization

from semmae_jax import checkpoint
from semmae_jax.checkpoint.integrity import CheckpointDamaged, reading
from semmae_jax.checkpoint.manager import ARRAY_ITEMS
from semmae_jax.checkpoint.train_state import holds_training_state
from semmae_jax.cli import main as cli_main
from semmae_jax.key_paths import flat_by_path
from semmae_jax.runtime.run_lock import LOCK_NAME
from semmae_jax.runtime.run_log import epoch_lines
from semmae_jax.train.loop import EpochStats

pytestmark = pytest.mark.usefixtures("demo_root")
TINY = ["--model", "mae_vit_test_patch4", "--input_size", "32", "--batch_size", "2", "--steps_per_epoch", "2",
        "--num_workers", "2", "--log_every", "1", "--vis_every", "100", "--warmup_epochs", "0", "--save_every", "1"]


def pretrain(out: Path, *flags: str) -> None:
    cli_main(["pretrain", *TINY, "--output_dir", str(out), *flags])


def steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def lines(out: Path) -> list[dict]:
    return epoch_lines(out)


def all_finite(tree) -> bool:
    import jax

    return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_divergence_keeps_every_checkpoint_finite_and_resumes_with_a_sane_lr(tmp_path):
    """The warm-up starts at lr 0, so the first steps are sane; then an update blows the params up
    (still finite) and the loss from them is not: the checkpoints from there on have diverged."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        pretrain(out, "--epochs", "4", "--warmup_epochs", "4", "--blr", "1e6", "--save_every_steps", "1")
    message = str(stop.value)
    named = re.search(r"the last good checkpoint is step (\d+) in (\S+) \(diverged steps \[(.*)\]", message)
    assert message.startswith("main.py pretrain: error: Loss is non-finite at epoch") and named, message
    assert int(named.group(1)) == steps(out)[-1]
    aside = sorted(int(p.name.split(".")[0]) for p in (out / "checkpoints").glob("*.diverged"))
    assert aside and [int(s) for s in named.group(3).split(",")] == aside
    for directory in [out / "checkpoints" / str(s) for s in steps(out)] + list((out / "checkpoints").glob("*.diverged")):
        step = checkpoint.open_step(directory)  # nothing non-finite was ever saved: params, AdamW's moments, ...
        items = sorted(step.item_names() & set(ARRAY_ITEMS))
        assert {"params", "opt_state", "train_state"} <= set(items), (directory, items)
        for item in items:
            assert all_finite(step.host_arrays(item)), (directory, item)
    pretrain(out, "--epochs", "4", "--warmup_epochs", "4", "--blr", "1e-4", "--save_every_steps", "1")  # sane lr
    assert steps(out)[-1] == 8 and np.isfinite(lines(out)[-1]["train_loss"])


@pytest.mark.slow
def test_skipped_non_finite_steps_are_counted_and_not_applied(tmp_path):
    out = tmp_path / "run"
    pretrain(out, "--epochs", "1", "--blr", "1e6", "--max_nonfinite_steps", "100")
    line = lines(out)[-1]
    assert line["nonfinite_steps"] >= 1 and np.isfinite(line["train_loss"])
    params, _ = checkpoint.load_params(out / "checkpoints")
    assert all_finite(params)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A finished 2-epoch run (steps 2 and 4 kept), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("faults") / "run"
    pretrain(out, "--epochs", "2")
    return out


def _damaged_copy(two_epochs: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    return out


def _data_files(step_dir: Path, item: str) -> list[Path]:
    return sorted(p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "deleted", "missing item", "flipped bytes", "garbled config"])
def test_a_damaged_latest_step_falls_back_to_the_previous_one(damage, two_epochs, tmp_path, capsys, monkeypatch):
    out = _damaged_copy(two_epochs, tmp_path)
    latest = out / "checkpoints" / "4"
    files = _data_files(latest, "params")
    if damage == "truncated":
        os.truncate(files[0], 10)
    elif damage == "deleted":
        files[0].unlink()
    elif damage == "missing item":
        shutil.rmtree(latest / "opt_state")
    elif damage == "garbled config":  # a JSON item: the saved flags that resuming compares first
        (latest / "config" / "metadata").write_text("{garbage")
    else:
        for file in files:  # flip 8 bytes in the middle of every array file (some may hold unused bytes)
            with open(file, "r+b") as f:
                f.seek(file.stat().st_size // 2)
                chunk = f.read(8)
                f.seek(-len(chunk), 1)
                f.write(bytes(b ^ 0xFF for b in chunk))
    unraisable = []  # what Python would print as tracebacks from other threads (the reads orbax abandons)
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capsys.readouterr()
    pretrain(out, "--epochs", "3")
    printed = capsys.readouterr()
    assert re.search(r"checkpoint step 4: .* damaged, moved to 4\.damaged; trying the previous one", printed.out)
    assert "resuming this run from its checkpoint at step 2" in printed.out
    assert "Traceback" not in printed.err
    assert [repr(u.exc_value) for u in unraisable] == []
    assert (out / "checkpoints" / "4.damaged").is_dir() and steps(out)[-1] == 6
    params, _ = checkpoint.load_params(out / "checkpoints")
    assert all_finite(params)


@pytest.mark.slow
def test_weights_from_a_damaged_step_are_refused_in_one_line_naming_it(two_epochs, tmp_path):
    """`finetune --finetune` from a run whose latest step is damaged. In a process of its own: the
    reads orbax abandons report late, some at exit, and only stderr shows all of it."""
    out = _damaged_copy(two_epochs, tmp_path)
    os.truncate(_data_files(out / "checkpoints" / "4", "params")[0], 10)
    run = subprocess.run([sys.executable, "main.py", "finetune", "--model", "vit_test_patch4", "--input_size", "32",
                          "--nb_classes", "4", "--batch_size", "2", "--epochs", "1", "--finetune", str(out / "checkpoints"),
                          "--output_dir", str(tmp_path / "tuned")], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 1
    assert re.search(rf"^main\.py finetune: error: checkpoint {re.escape(str(out))}/checkpoints/4 is damaged: its "
                     "metadata cannot be read: OUT_OF_RANGE", run.stderr, re.MULTILINE), run.stderr
    for noise in ("Traceback", "Event loop is closed", "Task exception was never retrieved"):
        assert noise not in run.stderr


@pytest.mark.slow
def test_another_runs_damaged_latest_step_is_named_as_such(two_epochs, tmp_path):
    """`--resume OTHER_RUN` and `linprobe --eval --resume RUN` first ask whether it holds a training state."""
    out = _damaged_copy(two_epochs, tmp_path)
    os.truncate(_data_files(out / "checkpoints" / "4", "params")[0], 10)
    run = checkpoint.RunCheckpoints(out / "checkpoints", async_save=False, create=False)
    with pytest.raises(CheckpointDamaged, match=rf"^checkpoint {re.escape(str(out))}/checkpoints/4 is damaged: its "
                       "metadata cannot be read: OUT_OF_RANGE"):
        holds_training_state(run)
    run.close()


@pytest.mark.slow
def test_weights_are_read_from_a_run_directory_as_from_its_checkpoints_root(two_epochs):
    """What `--finetune`, `eval --resume`, `visualize`, `features` read: a run directory reads as its
    `checkpoints/` root, both the latest step (4), whose weights are not the earlier step's."""
    root = two_epochs / "checkpoints"
    assert [str(checkpoint.open_step(path).directory) for path in (two_epochs, root)] == [str(root / "4")] * 2
    by_run, _ = checkpoint.load_params(two_epochs)
    by_root, _ = checkpoint.load_params(root)
    earlier, _ = checkpoint.load_params(root / "2")
    assert same_arrays(by_run, by_root)
    assert not same_arrays(by_run, earlier)  # the comparison tells two steps apart


def same_arrays(a, b) -> bool:
    """Same paths, and every array equal."""
    a, b = flat_by_path(a), flat_by_path(b)
    return a.keys() == b.keys() and all(np.array_equal(a[path], b[path]) for path in a)


def test_a_failed_read_drops_only_the_noise_of_the_reads_orbax_abandons(monkeypatch, caplog):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with pytest.raises(CheckpointDamaged, match=r"^step 7: no such array$"), reading("step 7"):
        raise ValueError("no such array")
    # a read orbax left pending on its closed loop, collected: closing it turns GeneratorExit into orbax's own error
    orbax_read = serialization._read_array_index_and_device_put(
        [], (), None, global_shape=(), new_shard_shape=(), dtype=None, byte_limiter=None, strict=True, dll=None,
        memory_kind=None)
    not_orbax = asyncio.sleep(0)
    closed = Exception("Encountered error while reading array index")
    closed.__cause__ = GeneratorExit()
    try:
        for coroutine, error in ((None, RuntimeError("Event loop is closed")), (None, RuntimeError("another")),
                                 (orbax_read, closed), (not_orbax, closed), (orbax_read, RuntimeError("a read's bug"))):
            sys.unraisablehook(SimpleNamespace(exc_value=error, object=coroutine))
    finally:
        orbax_read.close()
        not_orbax.close()
    assert [(u.object, str(u.exc_value)) for u in seen] == [
        (None, "another"), (not_orbax, str(closed)), (orbax_read, "a read's bug")]
    orbax_task = f"task: <Task pending coro=<_read_array_index_and_device_put() running at {serialization.__file__}:320>>"
    own_task = f"task: <Task pending coro=<read() running at {__file__}:1>>"
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for message in (f"Task exception was never retrieved\n{orbax_task}", f"Task was destroyed but it is pending!\n"
                        f"{orbax_task}", f"Task was destroyed but it is pending!\n{own_task}", "Unclosed event loop"):
            logging.getLogger("asyncio").error(message)
    assert [record.getMessage() for record in caplog.records] == [
        f"Task was destroyed but it is pending!\n{own_task}", "Unclosed event loop"]


@pytest.mark.slow
def test_with_every_step_damaged_scratch_is_refused_unless_asked(two_epochs, tmp_path):
    out = _damaged_copy(two_epochs, tmp_path)
    for step in (2, 4):
        shutil.rmtree(out / "checkpoints" / str(step) / "params")
    with pytest.raises(SystemExit, match=r"no readable checkpoint is left .* --resume scratch"):
        pretrain(out, "--epochs", "2")
    pretrain(out, "--epochs", "2", "--resume", "scratch")
    assert steps(out) == [2, 4] and sorted(p.name for p in (out / "checkpoints").glob("*.damaged")) == [
        "2.damaged", "4.damaged"]


@pytest.mark.slow
def test_resuming_with_flags_that_change_the_run_is_refused(two_epochs, tmp_path, capsys):
    out = _damaged_copy(two_epochs, tmp_path)
    with pytest.raises(SystemExit, match=r"started with other settings: --seed 1 \(saved 0\)"):
        pretrain(out, "--epochs", "3", "--seed", "1")
    assert steps(out) == [2, 4]  # nothing written
    capsys.readouterr()
    pretrain(out, "--epochs", "3", "--log_every", "2")  # harmless changes are noted
    assert "note: --log_every is 2; the run in" in capsys.readouterr().out
    pretrain(out, "--epochs", "4", "--seed", "1", "--allow_config_change")
    assert steps(out)[-1] == 8


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        import socket

        (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": "now"}))
        with pytest.raises(SystemExit, match=rf"{re.escape(str(out))} is in use by another run \(host .*, pid "
                                             rf"{holder.pid}, since now\)"):
            pretrain(out, "--epochs", "1")
        assert not (out / "checkpoints").exists() and not (out / "log.txt").exists()
    finally:
        holder.kill()
        holder.wait()
    pretrain(out, "--epochs", "1")  # the holder is dead now: taken over
    assert f"held by pid {holder.pid} on this host, which is gone; taking it over" in capsys.readouterr().out
    assert steps(out) == [2] and not (out / LOCK_NAME).exists()  # released at exit


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_writes_no_epoch_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    pretrain(out, "--epochs", "1")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1024))
    with pytest.raises(SystemExit) as stop:
        pretrain(out, "--epochs", "2")
    assert re.fullmatch(r"main\.py pretrain: error: cannot write checkpoint step 4 in \S+: 0 MiB free, about \d+ MiB "
                        r"needed \(disk full\?\); earlier steps are intact: free space and rerun the same command to "
                        r"resume", str(stop.value))
    monkeypatch.undo()
    assert [line["epoch"] for line in lines(out)] == [0]
    pretrain(out, "--epochs", "2")
    assert [line["epoch"] for line in lines(out)] == [0, 1]  # no epoch twice after the rerun


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "-1"], "--epochs must be at least 1, got -1"),
    (["--num_workers", "0"], "--num_workers must be at least 1, got 0"),
    (["--mask_ratio", "1.0", "--setting", "0"], r"--mask_ratio must be in \[0, 1\)"),
    (["--config", "nonexistent"], "--config: no preset 'nonexistent'"),
])
def test_bad_flags_are_one_line_before_anything_starts(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit, match=f"^main.py pretrain: error: {message}"):
        cli_main(["pretrain", *flags, "--output_dir", str(tmp_path / "run")])
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_epoch_cut_and_resumed_reports_the_whole_epochs_loss(tmp_path):
    out = tmp_path / "run"
    pretrain(out, "--epochs", "1", "--steps_per_epoch", "4", "--save_every_steps", "2")
    straight = lines(out)[-1]
    shutil.rmtree(out / "checkpoints" / "4")  # as if killed after the step-2 save
    before_cut = checkpoint.RunCheckpoints(out / "checkpoints").json_item(2, "epoch_stats")["seconds"]
    pretrain(out, "--epochs", "1", "--steps_per_epoch", "4", "--save_every_steps", "2")
    resumed = lines(out)[-1]
    np.testing.assert_allclose(resumed["train_loss"], straight["train_loss"], rtol=1e-6)
    assert resumed["seconds"] > before_cut > 0  # the cut part's time counts too


def test_epoch_stats_carry_the_seconds_before_a_resume():
    saved = EpochStats(good=2.0, start=time.perf_counter() - 3.0).as_json()
    resumed = EpochStats.from_json(saved)
    assert saved["seconds"] >= 3.0 and resumed.seconds() >= saved["seconds"]
    assert int(resumed.first_diverged) == -1  # no divergence carried in by the field order


@pytest.mark.slow
def test_eval_names_a_head_of_another_shape_once_and_counts_unreadable_images(demo_root, tmp_path, capsys):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from semmae_jax.models import create_model

    def saved(classes: int) -> str:
        model = create_model("vit_test_patch4", num_classes=classes)
        params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
        meta = {"model": "vit_test_patch4", "model_overrides": {"num_classes": classes}}
        checkpoint.save_params(tmp_path / f"vit{classes}", jax.tree.map(np.asarray, params), meta)
        return str(tmp_path / f"vit{classes}")

    flags = ["eval", "--model", "vit_test_patch4", "--input_size", "32", "--nb_classes", "4", "--num_workers", "2",
             "--batch_size", "4", "--output_dir", str(tmp_path / "eval")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli_main([*flags, "--resume", saved(10), "--data_path", str(demo_root)])
    message, printed = str(stop.value), capsys.readouterr()
    assert "other shape: head/bias (model (4,)), head/kernel (model (32, 4))" in message
    for name in ("head/bias", "head/kernel"):  # named once, as of another shape, not also as missing and unexpected
        assert message.count(name) == 1, message
    assert "missing" not in message and "unexpected" not in message
    assert (printed.out + printed.err + message).count("other shape:") == 1  # and the line shown once
    data = tmp_path / "data"
    shutil.copytree(demo_root / "val", data / "val")
    broken = sorted((data / "val").rglob("*.jpg")) or sorted((data / "val").rglob("*.JPEG"))
    broken[0].write_bytes(b"not a jpeg")
    capsys.readouterr()
    cli_main([*flags, "--resume", saved(4), "--data_path", str(data)])
    out = capsys.readouterr().out
    count = sum(1 for p in (data / "val").rglob("*") if p.is_file())
    assert f"Accuracy of the network on the {count - 1} test images" in out
    assert out.count("unreadable image(s) left out") == 1 and "1 unreadable image(s) left out" in out


def test_a_plain_pickle_is_refused_as_a_pickle_not_called_corrupt(tmp_path):
    import pickle

    from convert.safe_load import load_torch_checkpoint
    from convert.table import ConversionError

    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(3)}}))
    with pytest.raises(ConversionError, match=r"a plain Python pickle, not a torch\.save file: refused") as error:
        load_torch_checkpoint(path)
    assert "corrupt" not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["id 200", "rgb"])
def test_a_bad_part_map_is_refused_naming_the_map_and_setting_0_never_reads_maps(bad, demo_root, tmp_path):
    from PIL import Image

    parts = tmp_path / "parts"
    shutil.copytree(demo_root / "parts", parts)
    victim = sorted((parts / "train").rglob("*.png"))[0]
    labels = np.asarray(Image.open(victim))
    if bad == "id 200":
        Image.fromarray(np.where(labels == 1, 200, labels).astype(np.uint8)).save(victim)
        message = r"holds the value 200, not a part id: ids must be 0\.\.7 \(--num_parts 8\) or 255"
    else:
        Image.fromarray(np.stack([labels] * 3, -1).astype(np.uint8)).save(victim)
        message = "is not a single-channel PNG"
    flags = ["--data_path", str(demo_root), "--part_path", str(parts), "--steps_per_epoch", "100", "--epochs", "1",
             "--batch_size", "8"]
    with pytest.raises(SystemExit, match=rf"the part map of \S+ \({re.escape(str(victim))}\) {message}"):
        pretrain(tmp_path / "run", *flags, "--setting", "3", "--num_parts", "8")
    victim.write_bytes(b"not a png")  # with random masking the maps are never read: nothing to skip
    pretrain(tmp_path / "run0", *flags, "--setting", "0")
    assert lines(tmp_path / "run0")[-1]["epoch"] == 0


def test_with_batch_1_an_unreadable_image_is_said_to_be_left_blank_not_replaced(demo_root, tmp_path, caplog):
    import logging

    from semmae_jax.data.pipeline import TrainLoader
    from semmae_jax.data.sources import image_folder
    from semmae_jax.data.transforms import TrainTransform

    folder = tmp_path / "data" / "train" / "blob"
    folder.mkdir(parents=True)
    for image in sorted((demo_root / "train" / "blob").glob("*.jpg"))[:4]:
        shutil.copy(image, folder)
    sorted(folder.glob("*.jpg"))[0].write_bytes(b"not a jpeg")
    loader = TrainLoader(image_folder(tmp_path / "data", "train"), process_batch=1, num_workers=1,
                         transform=TrainTransform(img_size=32, patch_size=4), process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING):
        batches = list(loader.epoch_batches(0))
    assert len(batches) == 4 and len(loader.skipped) == 1
    assert "1 unreadable image(s): 1 left blank" in caplog.text and "replaced by others" not in caplog.text
