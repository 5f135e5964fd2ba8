"""End-to-end pretraining: the demo command, resume after a kill, another mesh, a NaN stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from run_dirs import committed_steps

from semmae_jax import checkpoint, sharding
from semmae_jax.cli import main as cli_main
from semmae_jax.key_paths import flat_by_path
from semmae_jax.runtime.run_log import epoch_lines

pytestmark = pytest.mark.usefixtures("demo_root")
REPO = Path(__file__).resolve().parent.parent
# A tiny model on the demo data: 32 x 32 crops, 4 x 4 patches; 2 steps of 16 images an epoch.
TINY = ["--model", "mae_vit_test_patch4", "--input_size", "32", "--batch_size", "2", "--steps_per_epoch", "2",
        "--num_workers", "2", "--log_every", "1", "--vis_every", "1", "--save_every", "1", "--warmup_epochs", "1"]


def pretrain(*flags: str) -> None:
    cli_main(["pretrain", *TINY, *flags])


def final_params(output_dir: Path):
    params, _ = checkpoint.load_params(output_dir / "checkpoints")
    return params


@pytest.mark.slow
def test_no_argument_demo_runs_end_to_end(tmp_path):
    """`python main.py pretrain` with only shortening flags: falling loss, checkpoint, logs, picture.

    The batch is per device and the tests see 8 fake devices: 8 x 8 is the demo's 64.
    """
    out = tmp_path / "demo"
    cli_main(["pretrain", "--batch_size", "8", "--epochs", "3", "--steps_per_epoch", "4", "--log_every", "2",
              "--output_dir", str(out)])
    lines = epoch_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert {"train_loss", "train_lr", "train_alpha", "epoch"} <= set(lines[0])
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[0]["train_alpha"] < lines[-1]["train_alpha"] <= 1.0  # setting 3: intra -> inter
    assert (out / "checkpoints" / "12" / "params").is_dir()
    assert list(out.glob("events.out.tfevents.*"))
    assert (out / "reconstruction_epoch0002.png").is_file()
    params, _ = checkpoint.load_params(out / "checkpoints")
    assert params["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (128, 512)  # the demo preset's model


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_the_same_parameters(tmp_path):
    flags = ["--epochs", "3", "--seed", "3"]
    pretrain(*flags, "--output_dir", str(tmp_path / "straight"))
    victim = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the same 8 devices as this process
    proc = subprocess.Popen([sys.executable, "main.py", "pretrain", *TINY, *flags, "--output_dir", str(victim)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not committed_steps(victim / "checkpoints"):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = checkpoint.RunCheckpoints(victim / "checkpoints").latest_step()
    assert killed_at is not None and killed_at < 6
    pretrain(*flags, "--output_dir", str(victim))  # the same command again: resumes
    jax.tree.map(np.testing.assert_array_equal, final_params(victim), final_params(tmp_path / "straight"))


@pytest.mark.slow
def test_a_checkpoint_restores_onto_another_mesh_and_continues(tmp_path):
    """An uninterrupted 2-epoch run on a data-parallel mesh, and its copy cut back to epoch 0's
    checkpoint (as if stopped there) continued on a data x fsdp x tensor mesh: the continuation ends
    with the uninterrupted run's parameters (up to the meshes' reduction order)."""
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    pretrain("--epochs", "2", "--mesh", "data:8", "--output_dir", str(straight))
    shutil.copytree(straight, moved)
    shutil.rmtree(moved / "checkpoints" / "4")
    pretrain("--epochs", "2", "--mesh", "data:2,fsdp:2,tensor:2", "--output_dir", str(moved))
    assert committed_steps(moved / "checkpoints") == [2, 4]
    moved_params, straight_params = flat_by_path(final_params(moved)), flat_by_path(final_params(straight))
    for path, value in straight_params.items():
        if path.endswith("qkv/bias"):  # the key third has no gradient in exact arithmetic: Adam turns the
            value, moved_params[path] = value[::2], moved_params[path][::2]  # meshes' rounding into lr-sized steps
        np.testing.assert_allclose(moved_params[path], value, rtol=1e-4, atol=1e-6, err_msg=path)


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain("--epochs", "1", "--output_dir", str(out))
    good = final_params(out)
    with pytest.raises(SystemExit, match=r"Loss is non-finite at epoch 1 step [34] .*, stopping training; "
                                         r"the last good checkpoint is step 2"):
        pretrain("--epochs", "3", "--lr", "1e30", "--output_dir", str(out))
    assert checkpoint.RunCheckpoints(out / "checkpoints").latest_step() == 2
    jax.tree.map(np.testing.assert_array_equal, final_params(out), good)


def test_pretraining_reads_a_flat_folder_of_unlabelled_images_and_its_packed_copy_alike(tmp_path):
    """No class folders (`tiles/<image>`): every image read, unlabelled; `prepare` packs it to the same batches."""
    from PIL import Image

    flat, packed = tmp_path / "tiles", tmp_path / "packed"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for k in range(32):  # 2 steps of 16
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(flat / f"{k:02d}.png")
    cli_main(["prepare", "--data_path", str(flat), "--out", str(packed)])
    losses = []
    for data_path in (flat, packed):
        out = tmp_path / f"{data_path.name}_run"
        pretrain("--setting", "0", "--epochs", "1", "--vis_every", "100", "--data_path", str(data_path),
                 "--output_dir", str(out))
        losses.append([line["train_loss"] for line in epoch_lines(out)])
    assert len(losses[0]) == 1 and np.isfinite(losses[0][0]) and losses[0] == losses[1]


def test_bad_flags_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown model 'mae_vit_tiny'"):
        pretrain("--model", "mae_vit_tiny", "--output_dir", str(tmp_path))
    with pytest.raises(SystemExit, match="needs 3 devices, but 8 are available"):
        pretrain("--mesh", "data:3", "--output_dir", str(tmp_path))
    with pytest.raises(SystemExit, match=r"--data_path .* does not exist"):
        pretrain("--data_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path))


def test_the_originals_command_line_is_accepted(tmp_path, demo_root):
    """main_pretrain_setting3.py's flags as the SemMAE README writes them, on an image folder."""
    from semmae_jax.jobs.pretrain import parse

    root = demo_root
    config = parse(["--output_dir", str(tmp_path), "--log_dir", str(tmp_path), "--batch_size", "128",
                    "--model", "mae_vit_base_patch16", "--norm_pix_loss", "--mask_ratio", "0.75", "--epochs", "800",
                    "--warmup_epochs", "40", "--blr", "1.5e-4", "--weight_decay", "0.05", "--setting", "3",
                    "--data_path", str(root)])
    assert (config.model, config.batch_size, config.norm_pix_loss, config.setting, config.blr) == (
        "mae_vit_base_patch16", 128, True, 3, 1.5e-4)
    assert config.data_path == str(root) and config.warmup_epochs == 40
    assert sharding.parse_mesh(config.mesh)["data"] == -1
