"""Non-square input (`--input_size HEIGHT WIDTH`) through the jobs: the flag, pretraining with
semantic masking on an H x W patch grid, fine-tuning at another H x W from that checkpoint (its
position table resampled), stage 1, and the encoder's patch-token map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from semmae_jax import checkpoint
from semmae_jax.cli import main as cli_main
from semmae_jax.jobs.pretrain import parse
from semmae_jax.runtime.run_log import epoch_lines

STEPS = ["--epochs", "1", "--steps_per_epoch", "2", "--warmup_epochs", "1", "--num_workers", "2", "--save_every", "1"]


def test_input_size_takes_one_side_or_a_height_and_a_width():
    assert parse(["--model", "mae_vit_test_patch4", "--input_size", "24", "40"]).input_size == (24, 40)
    assert parse(["--model", "mae_vit_test_patch4", "--input_size", "32", "32"]).input_size == 32  # square: one side
    assert parse(["--model", "mae_vit_test_patch4", "--input_size", "32"]).input_size == 32


@pytest.mark.parametrize(("flags", "message"), [
    (["--input_size", "24", "40", "8"], "--input_size: an image size is one side or a height and a width"),
    (["--input_size", "24", "30"], "image size 24x30 is not a multiple of the patch size 4 of model mae_vit_test_patch4"),
])
def test_a_bad_input_size_is_one_line_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pretrain", "--model", "mae_vit_test_patch4", *flags, "--output_dir", "unused"])
    said = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err.strip()
    assert message in said and "\n" not in said.split("error: ", 1)[-1]


@pytest.mark.slow
@pytest.mark.usefixtures("demo_root")
def test_a_non_square_run_from_pretraining_to_features(tmp_path, capsys):
    pretrained, tuned, parts = tmp_path / "pretrain", tmp_path / "finetune", tmp_path / "parts"
    cli_main(["pretrain", "--model", "mae_vit_test_patch4", "--input_size", "24", "40", "--batch_size", "4",
              "--setting", "3", "--vis_every", "1", *STEPS, "--output_dir", str(pretrained)])
    saved = json.loads(next((pretrained / "checkpoints").glob("*/config/metadata")).read_text())
    assert saved["input_size"] == [24, 40]
    trained = epoch_lines(pretrained)[-1]
    assert np.isfinite(trained["train_loss"]) and trained["train_alpha"] > 0  # semantic masking: the demo's parts
    assert (pretrained / "reconstruction_epoch0000.png").is_file()
    capsys.readouterr()

    cli_main(["finetune", "--config", "finetune_demo", "--model", "vit_test_patch4", "--input_size", "32", "48",
              "--finetune", str(pretrained / "checkpoints"), *STEPS, "--output_dir", str(tuned)])
    assert f"loaded {pretrained / 'checkpoints'}" in capsys.readouterr().out
    assert 0 <= epoch_lines(tuned)[-1]["test_acc1"] <= 100
    assert checkpoint.load_params(tuned / "checkpoints")[0]["pos_embed"].shape == (1, 1 + 8 * 12, 32)  # 6x10 -> 8x12

    cli_main(["parts", "train", "--config", "parts_demo", "--backbone", str(pretrained / "checkpoints"), *STEPS,
              "--output_dir", str(parts)])
    assert "at 24x40 (6x10 patches)" in capsys.readouterr().out
    assert np.isfinite(epoch_lines(parts)[-1]["train_loss"])

    cli_main(["features", "--checkpoint", str(pretrained / "checkpoints"), "--tokens", "patch", "--layers", "1",
              "--batch_size", "64", "--out", str(tmp_path / "features.npz")])
    features = np.load(tmp_path / "features.npz")
    assert features["features"].shape[1:] == (6, 10, 32) and features["layers"].shape[1:] == (1, 6, 10, 32)
