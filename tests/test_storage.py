"""Output locations that are not local folders: `--output_dir gs://bucket/run` goes to the bucket
(through etils.epath), never to a local folder of that name; a URL nothing can open is one line."""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils

from semmae_jax import checkpoint
from semmae_jax.cli import main as cli_main
from semmae_jax.runtime import run_lock
from semmae_jax.runtime.run_log import RunLog
from semmae_jax.runtime.storage import output_path

BUCKET = "gs://bucket"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A test double of `gs://bucket` (no bucket is reachable here): epath's file operations on
    gs:// paths land in a local folder; local-only calls (disk usage, exclusive create) fail."""
    backing = tmp_path / "bucket"
    backing.mkdir()

    def local(path):
        text = os.fspath(path)
        return str(backing) + text[len(BUCKET):] if text.startswith(BUCKET) else text

    def on_local(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def renamed(fn, path, target, *args, **kwargs):
        return fn(local(path), local(target), *args, **kwargs)

    def local_only(*args, **kwargs):
        raise AssertionError(f"a local-only call on {args[:1]}")

    real_open = os.open
    monkeypatch.setattr(shutil, "disk_usage", local_only)
    monkeypatch.setattr(os, "open", lambda path, *a, **k: local_only(path) if "gs:" in os.fspath(path)
                        else real_open(path, *a, **k))
    monkeypatch.chdir(tmp_path)  # a stray local "gs:" folder would appear here
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else epath picks TensorFlow's gs:// over the double
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # orbax asks the bucket
    names = ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree", "stat", "walk")
    with epath_testing.mock_epath(**dict.fromkeys(names, on_local), rename=renamed, replace=renamed, copy=renamed):
        yield backing
    assert not (tmp_path / "gs:").exists()


def test_a_url_no_backend_opens_is_one_clear_error_and_no_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^--output_dir s3://bucket/run: no file system backend can open it"):
        output_path("s3://bucket/run")
    with pytest.raises(SystemExit, match=r"--output_dir nosuch://bucket/run: no file system backend can open it"):
        cli_main(["pretrain", "--epochs", "1", "--output_dir", "nosuch://bucket/run"])
    assert list(tmp_path.iterdir()) == []


def test_the_lock_and_the_log_of_a_gs_run_go_to_the_bucket(bucket, monkeypatch):
    written = {}

    class Writer:  # TensorBoard's writer goes through TensorFlow's own gs:// support: record where it was pointed
        def __init__(self, logdir):
            written["logdir"] = logdir

        def scalar(self, *args):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr("flax.metrics.tensorboard.SummaryWriter", Writer)
    with run_lock.run_lock(f"{BUCKET}/run"):
        assert (bucket / "run" / run_lock.LOCK_NAME).is_file()
        with pytest.raises(RuntimeError, match="is in use by another run"), run_lock.run_lock(f"{BUCKET}/run"):
            pass
        log = RunLog(f"{BUCKET}/run")
        log.epoch_line({"epoch": 0, "train_loss": 1.5})
        log.epoch_line({"epoch": 1, "train_loss": 1.2})
        log.close()
    assert not (bucket / "run" / run_lock.LOCK_NAME).exists()
    assert (bucket / "run" / "log.txt").read_text().count("train_loss") == 2
    assert written["logdir"] == f"{BUCKET}/run"


def test_a_gs_checkpoint_root_skips_the_local_free_space_check(bucket, monkeypatch):
    checkpoints = checkpoint.RunCheckpoints(f"{BUCKET}/run/checkpoints", async_save=False)
    assert os.fspath(checkpoints.directory) == f"{BUCKET}/run/checkpoints" and checkpoints.all_steps() == []
    assert (bucket / "run" / "checkpoints").is_dir()
    saved = []
    monkeypatch.setattr(checkpoints._manager, "save", lambda step, **kwargs: saved.append(step))
    checkpoints.save(3, {"params": {"w": jnp.ones(4)}}, {"meta": {}})  # no shutil.disk_usage (it would raise)
    assert saved == [3]

