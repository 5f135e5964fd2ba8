"""`--input_size HEIGHT WIDTH`: the flag and its one-line errors. The jobs run non-square in
tests/test_bands.py (pretraining at 24 x 40, fine-tuning at 32 x 48 from it, stage 1, features) and
tests/test_labelled_tokens.py (semantic masking on a 24 x 40 grid); the models, transforms and the
converter in tests/test_models.py, test_data_transforms.py, test_parity.py and test_convert*.py."""

from __future__ import annotations

import pytest

from semmae_jax.cli import main as cli_main
from semmae_jax.jobs.pretrain import parse

STEPS = ["--epochs", "1", "--steps_per_epoch", "2", "--warmup_epochs", "1", "--num_workers", "2", "--save_every", "1"]


def test_input_size_takes_one_side_or_a_height_and_a_width():
    assert parse(["--model", "mae_vit_test_patch4", "--input_size", "24", "40"]).input_size == (24, 40)
    assert parse(["--model", "mae_vit_test_patch4", "--input_size", "32", "32"]).input_size == 32  # square: one side
    assert parse(["--model", "mae_vit_test_patch4", "--input_size", "32"]).input_size == 32


@pytest.mark.parametrize(("flags", "message"), [
    (["--input_size", "24", "40", "8"], "--input_size: an image size is one side or a height and a width"),
    (["--input_size", "24", "30"], "image size 24x30 is not a multiple of the patch size 4 of model mae_vit_test_patch4"),
])
def test_a_bad_input_size_is_one_line_naming_the_flag(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pretrain", "--model", "mae_vit_test_patch4", *flags, "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # refused before anything is written
    said = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err.strip()
    assert message in said and "\n" not in said.split("error: ", 1)[-1]
