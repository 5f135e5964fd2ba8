"""`--global_batch_size`: one batch geometry, and the demo presets' figures on any number of devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from semmae_jax.cli import main as cli_main
from semmae_jax.jobs.pretrain import parse
from semmae_jax.runtime.batch_geometry import BatchGeometry

ROOT = Path(__file__).resolve().parent.parent


def test_the_geometry_of_a_per_device_and_of_a_global_batch():
    per_device = BatchGeometry.from_flags(16, None, accum_iter=2, devices=8, processes=2)
    assert (per_device.per_device, per_device.global_batch, per_device.per_process, per_device.effective) == (16, 128, 64,
                                                                                                             256)
    pinned = BatchGeometry.from_flags(16, 64, devices=8, processes=2)
    assert (pinned.per_device, pinned.global_batch, pinned.per_process, pinned.effective) == (8, 64, 32, 64)
    assert BatchGeometry.from_flags(16, 64, devices=1, processes=1).per_device == 64


@pytest.mark.parametrize("global_batch", [12, 4])
def test_a_global_batch_the_devices_do_not_divide_is_refused_in_one_line(global_batch):
    with pytest.raises(ValueError) as refused:
        BatchGeometry.from_flags(16, global_batch, devices=8, processes=1)
    assert str(refused.value) == (f"--global_batch_size {global_batch} does not split over the 8 devices of this run: "
                                  "give a multiple of 8")


def test_the_lr_follows_the_pinned_global_batch_not_the_devices():
    config = parse(["--global_batch_size", "64", "--blr", "1e-3"])
    assert config.learning_rate(config.batch_geometry()) == pytest.approx(1e-3 * 64 / 256)


def test_a_per_device_batch_given_alone_replaces_the_presets_global_batch():
    assert parse([]).batch_geometry().global_batch == 64  # the demo preset pins 64, on any device count
    given = parse(["--batch_size", "2"])
    assert (given.global_batch_size, given.batch_size) == (None, 2)
    assert parse(["--batch_size", "2", "--global_batch_size", "16"]).global_batch_size == 16


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    return [r["train_loss"] for r in records if "epoch" in r]


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["pretrain", "--epochs", "1", "--steps_per_epoch", "2", "--warmup_epochs", "1"],
    ["finetune", "--config", "finetune_demo", "--finetune", "none", "--epochs", "1", "--steps_per_epoch", "2",
     "--warmup_epochs", "1"],
], ids=["pretrain", "finetune_demo"])
def test_the_demo_presets_give_the_same_losses_on_1_and_8_devices(argv, demo_root, tmp_path):
    """One device in a process of its own; eight in this one (the suite's fake devices)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "main.py", *argv, "--output_dir", str(tmp_path / "one")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert jax.device_count() == 8
    cli_main([*argv, "--output_dir", str(tmp_path / "eight")])
    one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(one) == len(eight) == 1
    assert eight == pytest.approx(one, rel=1e-4)
