"""Flags that name steps, epochs or a window, held against the run they are given before its first step,
and `--input_size` defaulting to the model's own size."""

import pytest

from convert.parity import training as train_parity
from semmae_jax.jobs.pretrain import parse
from semmae_jax.train.skeleton import check_run_plan
from semmae_jax.training_length import TrainingLength

LENGTH = TrainingLength(epochs=2, steps_per_epoch=4, peak_lr=1e-3)  # 8 steps


class Lines:
    """A run log that keeps what it was told to print."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, *args) -> None:
        self.lines.append(" ".join(map(str, args)))


def plan(*flags: str, start_step: int = 0) -> list[str]:
    log = Lines()
    check_run_plan(parse(["--save_every", "1", "--log_every", "1", "--vis_every", "1", *flags]), LENGTH, start_step, log)
    return log.lines


def test_a_profiler_window_past_the_end_of_the_run_is_refused_in_one_line():
    with pytest.raises(ValueError) as refused:
        plan("--profile_steps", "3:9")
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith("--profile_steps 3:9: this run ends at step 8 (2 epochs of 4 steps = 8 steps)")
    assert plan("--profile_steps", "3:8") == []


def test_a_resume_past_the_end_says_there_is_nothing_to_train():
    assert plan(start_step=8) == ["the checkpoint resumed (step 8) already completes this run (2 epochs of 4 steps = 8 "
                                  "steps): nothing to train; raise --epochs to train further"]


def test_a_window_before_the_resumed_step_says_no_trace_is_taken():
    assert plan("--profile_steps", "1:3", start_step=4) == [
        "--profile_steps 1:3: the window lies before the resumed step 4; no trace is taken"]


@pytest.mark.parametrize(("flag", "value", "said"), [
    ("--save_every", "3", "--save_every 3 is longer than this run's 2 epochs: checkpoints at the end of the run only"),
    ("--save_every_steps", "9", "--save_every_steps 9 is longer than this run's 8 steps: no checkpoint between epoch ends"),
    ("--log_every", "20", "--log_every 20 is longer than this run's 8 steps: metrics are logged at the end of each epoch "
                          "only"),
    ("--vis_every", "5", "--vis_every 5 is longer than this run's 2 epochs: a picture at the end only"),
])
def test_a_period_longer_than_the_run_is_said_in_one_line(flag, value, said):
    assert plan(flag, value) == [said]


def test_input_size_defaults_to_the_models_own_size():
    assert parse(["--model", "mae_vit_test_patch4"]).input_size == 32
    assert parse(["--model", "mae_vit_base_patch16"]).input_size == 224
    assert parse(["--model", "mae_vit_base_patch16", "--input_size", "112"]).input_size == 112
    assert parse([]).input_size == 64  # the demo preset's model


def test_training_parity_builds_a_test_model_at_its_own_size():
    _, config = train_parity.parse(["--train", "pretrain", "--model", "mae_vit_test_patch4"])
    assert config.input_size == 32
