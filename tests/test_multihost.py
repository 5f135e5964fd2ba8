"""Real multi-process runs on this machine: 2 processes x 4 fake devices, joined by
`jax.distributed` (gloo), against 1 process x 8 devices with the same global batch."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np
import pytest
from torch_helpers import randomize_

from convert.arch import full_config
from convert.parity.references import timm_classifier
from convert.safe_load import save_torch_checkpoint
from semmae_jax import checkpoint
from semmae_jax.cli import main as cli_main
from semmae_jax.runtime.run_log import epoch_lines

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "mae_vit_test_patch4", "--input_size", "32", "--batch_size", "2", "--steps_per_epoch", "2",
        "--num_workers", "2", "--log_every", "1", "--save_every", "1", "--warmup_epochs", "1", "--vis_every", "100"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("demo_root")]
T = TypeVar("T")


def launch(*command: str, timeout: float = 400, processes: int = 2) -> subprocess.CompletedProcess:
    """`main.py launch -n 2 --devices_per_process 4 -- COMMAND`, always reaped."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "main.py", "launch", "-n", str(processes), "--devices_per_process", str(8 // processes),
            "--timeout", str(timeout - 30), "--grace", "5", "--", *command]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def params_of(output_dir: Path, step: int):
    return checkpoint.load_params(output_dir / "checkpoints" / str(step))[0]


def train_losses(output_dir: Path) -> list[float]:
    return [line["train_loss"] for line in epoch_lines(output_dir)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-process pretraining of 2 epochs (4 steps, a checkpoint after each epoch)."""
    two = tmp_path_factory.mktemp("two") / "run"
    result = launch("pretrain", *TINY, "--epochs", "2", "--output_dir", str(two))
    assert result.returncode == 0, result.stderr[-3000:]
    return two


def test_two_processes_train_as_one_and_checkpoints_move_between_process_counts(two_process_run, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    shutil.copytree(two_process_run, two)
    cli_main(["pretrain", *TINY, "--epochs", "2", "--output_dir", str(one)])  # 1 process x 8 devices
    np.testing.assert_allclose(train_losses(two), train_losses(one), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params_of(two, 4),
                 params_of(one, 4))
    # Two processes' checkpoint continues in one process, one process's in two: same result.
    cli_main(["pretrain", *TINY, "--epochs", "3", "--output_dir", str(two)])
    result = launch("pretrain", *TINY, "--epochs", "3", "--output_dir", str(one))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming this run from its checkpoint at step 4" in result.stdout
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params_of(two, 6),
                 params_of(one, 6))


def started(argv: list[str], logs: Path) -> subprocess.Popen:
    """`argv` run from the repository, its stdout and stderr written to files in `logs` (read by `wait_for`)."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "stdout").open("w") as stdout, (logs / "stderr").open("w") as stderr:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True)


def wait_for(condition: Callable[[], T], process: subprocess.Popen, what: str, timeout: float) -> T:
    """Poll `condition` until it holds (and return its value); fail when `process` ends first or after
    `timeout` seconds, so that a run that hangs or dies never hangs the test."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)
    return result


def launched_pids(stdout: Path) -> dict[int, int] | None:
    """{process index: pid} once the launcher has printed both, else None."""
    pids = {int(i): int(pid) for i, pid in re.findall(r"^launch: process (\d) pid (\d+)$", stdout.read_text(), re.M)}
    return pids if len(pids) == 2 else None


def stopped(launcher: subprocess.Popen) -> None:
    """The launcher killed and reaped if it is still running (a failed test leaves nothing behind)."""
    if launcher.poll() is None:
        launcher.kill()
        launcher.wait(timeout=60)


def test_sigterm_to_one_process_stops_both_at_one_checkpoint_that_the_same_command_resumes(two_process_run,
                                                                                          tmp_path, capsys):
    """The notice reaches process 1 only, before the run's end: JAX's coordination service spreads
    it, both processes save the same step as one checkpoint and exit 0; the same command then
    ends with the parameters of the uninterrupted 2-process run (resumed here in this process, on
    the same 8 devices: the test above shows that 1 and 2 processes resume alike)."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    command = ["pretrain", *TINY, "--epochs", "2", "--output_dir", str(out)]
    launcher = started([sys.executable, "main.py", "launch", "-n", "2", "--devices_per_process", "4", "--timeout",
                        "300", "--", *command], logs)
    try:
        pids = wait_for(lambda: launched_pids(logs / "stdout"), launcher, "process ids", 120)
        wait_for(lambda: "pretrain mae_vit_test_patch4: global batch" in (logs / "stdout").read_text(), launcher,
                 "start of training", 240)
        time.sleep(2)  # both processes have joined jax.distributed (its SIGTERM handler is in place); no step yet
        os.kill(pids[1], signal.SIGTERM)
        launcher.wait(timeout=300)
    finally:
        stopped(launcher)
    stdout, stderr = (logs / "stdout").read_text(), (logs / "stderr").read_text()
    assert launcher.returncode == 0, stderr[-3000:]
    saved = checkpoint.RunCheckpoints(out / "checkpoints").all_steps()
    assert len(saved) == 1 and saved[0] < 4, saved  # one checkpoint, of the step every process stopped at
    assert f"preemption notice: saved a checkpoint at step {saved[0]}" in stdout
    capsys.readouterr()
    cli_main(command)
    assert f"resuming this run from its checkpoint at step {saved[0]}" in capsys.readouterr().out
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params_of(out, 4),
                 params_of(two_process_run, 4))


def acc_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("* Acc@1"))


def test_two_process_evaluation_counts_every_image_once(tmp_path, demo_root, capsys):
    model = randomize_(timm_classifier(full_config("vit_test_patch4", num_classes=4)), seed=1)
    pth = tmp_path / "vit.pth"
    save_torch_checkpoint(pth, {k: v.numpy() for k, v in model.state_dict().items()})
    flags = ["--model", "vit_test_patch4", "--input_size", "32", "--nb_classes", "4", "--batch_size", "3",
             "--resume", str(pth), "--data_path", str(demo_root), "--num_workers", "2"]
    result = launch("eval", *flags, "--output_dir", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    cli_main(["eval", *flags, "--output_dir", str(tmp_path / "one")])
    assert acc_line(result.stdout) == acc_line(capsys.readouterr().out)
    assert "on the 128 test images" in result.stdout
