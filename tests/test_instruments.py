"""The run instruments (`train/instruments.py`): step time, MFU, input wait, goodput and the trace.

One short pretraining run (tiny model, demo data, input slowed on purpose) checks what a job
writes; the rest drives `Instruments` directly, with a clock the test controls where a figure
must come out exact.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from semmae_jax import flops
from semmae_jax.cli import main as cli_main
from semmae_jax.data.pipeline import TrainLoader
from semmae_jax.models import create_model
from semmae_jax.runtime.run_log import RunLog, epoch_lines
from semmae_jax.train.instruments import PARTS, Instruments, Profile, Stopwatch

SLEEP = 0.25  # seconds the slowed input sleeps before each batch
PEAK = 2.0
# test_pretrain's tiny run (2 steps of 2 images x 8 devices an epoch): the same compiled programs.
TINY = ["--model", "mae_vit_test_patch4", "--input_size", "32", "--batch_size", "2", "--steps_per_epoch", "2",
        "--num_workers", "2", "--log_every", "1", "--vis_every", "1", "--save_every", "1", "--warmup_epochs", "1"]
STEPS, BATCH = 2, 16


@pytest.fixture(scope="module")
def slowed_run(tmp_path_factory, demo_root):
    """A pretraining run whose every batch comes `SLEEP` s late; (output dir, wall seconds, console)."""
    out = tmp_path_factory.mktemp("instruments") / "run"
    real = TrainLoader.epoch_batches

    def sleeping(self, epoch, start_step=0):
        for batch in real(self, epoch, start_step):
            time.sleep(SLEEP)
            yield batch

    patch = pytest.MonkeyPatch()
    patch.setattr(TrainLoader, "epoch_batches", sleeping)
    start = time.perf_counter()
    try:
        cli_main(["pretrain", *TINY, "--epochs", "1", "--profile_steps", "0:2", "--peak_tflops", str(PEAK),
                  "--output_dir", str(out)])
    finally:
        patch.undo()
    return out, time.perf_counter() - start


@pytest.mark.slow
def test_mfu_is_the_counters_flops_over_the_measured_step_time_and_the_given_peak(slowed_run):
    out, _ = slowed_run
    (line,) = epoch_lines(out)
    step_flops = flops.train_flops(create_model("mae_vit_test_patch4", img_size=32), 0.75) * BATCH
    assert line["model_tflops"] == pytest.approx(step_flops / line["step_time_s"] / 1e12, rel=1e-9)
    assert line["mfu"] == pytest.approx(step_flops / line["step_time_s"] / (PEAK * 1e12 * jax.device_count()), rel=1e-9)
    assert line["images_per_sec"] == pytest.approx(BATCH / line["step_time_s"], rel=1e-9)


@pytest.mark.slow
def test_slowed_input_shows_as_input_wait_and_goodput_adds_up_to_the_wall_time(slowed_run):
    out, wall = slowed_run
    (line,) = epoch_lines(out)
    assert line["input_wait"] * line["step_time_s"] * STEPS >= STEPS * SLEEP  # every sleep counted as waiting
    (record,) = [r["goodput"] for r in map(json.loads, (out / "log.txt").read_text().splitlines())
                 if "goodput" in r]
    parts = sum(record[f"{part}_s"] for part in PARTS)
    assert parts == pytest.approx(record["wall_s"], rel=1e-6)
    assert parts == pytest.approx(wall, rel=0.05)  # the test's own clock around the whole job
    assert record["input_wait_s"] >= STEPS * SLEEP
    assert record["compile_s"] > 0 and record["save_s"] > 0 and record["eval_s"] > 0
    assert record["goodput"] == pytest.approx(record["steps_s"] / record["wall_s"])


@pytest.mark.slow
def test_the_trace_holds_the_train_steps_program(slowed_run):
    out, _ = slowed_run
    (run_dir,) = (out / "plugins" / "profile").iterdir()  # TensorBoard's profile plugin layout
    (xplane,) = run_dir.glob("*.xplane.pb")
    assert b"jit_step" in xplane.read_bytes()
    assert b"jit_step" in gzip.decompress((run_dir / "perfetto_trace.json.gz").read_bytes())


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeStep:
    """A 'jitted step' whose compilation and every call take set (fake) seconds."""

    def __init__(self, clock: FakeClock, compile_s: float, step_s: float) -> None:
        self.clock, self.compile_s, self.step_s = clock, compile_s, step_s

    def lower(self, state, batch):
        return self

    def compile(self):
        self.clock.now += self.compile_s
        return self

    def memory_analysis(self):
        return None  # as a backend that gives no estimate: the memory check lets it run

    def __call__(self, state, batch):
        self.clock.now += self.step_s
        return state + 1, {}


def test_step_time_includes_input_wait_and_leaves_out_compilation_and_saves(tmp_path):
    clock = FakeClock()
    watch = Stopwatch(clock)
    instruments = Instruments(RunLog(tmp_path), 16, 1e9, 0.5, Profile(None, str(tmp_path), True), watch)

    steps = 4

    def batches():
        for _ in range(steps):
            clock.now += 0.1  # waiting for input
            yield "batch"

    step, source, state = FakeStep(clock, compile_s=7.0, step_s=0.3), batches(), 0
    for index in range(steps):
        state, _ = instruments.step(step, state, instruments.next_batch(source), index)
    with instruments.phase("save"):
        clock.now += 5.0
    figures = instruments.window(epoch=0)
    assert figures["step_time_s"] == pytest.approx(0.4)
    assert figures["input_wait"] == pytest.approx(0.25)
    assert figures["images_per_sec"] == pytest.approx(16 / 0.4)
    assert figures["mfu"] == pytest.approx(1e9 * 16 / 0.4 / (0.5e12 * jax.device_count()))
    seconds = watch.seconds()
    assert (seconds["compile"], seconds["save"], seconds["steps"], seconds["input_wait"]) == pytest.approx(
        (7.0, 5.0, 1.2, 0.4))
    assert "mfu" not in Instruments(RunLog(tmp_path), 16, 1e9, None, Profile(None, str(tmp_path), True)).window(0)


@pytest.mark.parametrize("sleep", [0.0, 0.05])
def test_input_wait_is_near_zero_from_memory_and_grows_when_the_input_sleeps(tmp_path, capsys, sleep):
    @jax.jit
    def step(state, batch):  # a few ms of device work, enough to hide the next batch's hand-over
        for _ in range(4):
            state = jnp.tanh(state @ batch)
        return state, {}

    in_memory = [jnp.full((256, 256), 1e-3) for _ in range(8)]

    def source():
        for batch in in_memory:
            if sleep:
                time.sleep(sleep)
            yield batch

    instruments = Instruments(RunLog(tmp_path), 256, None, None, Profile(None, str(tmp_path), True))
    batches, state = source(), jnp.eye(256)
    state, _ = instruments.step(step, state, instruments.next_batch(batches), 0)  # compiled here
    jax.block_until_ready(state)
    instruments.window(0)
    for index in range(1, len(in_memory)):
        state, _ = instruments.step(step, state, instruments.next_batch(batches), index)
    jax.block_until_ready(state)
    wait = instruments.window(0)["input_wait"]
    instruments.window(0)
    warnings = capsys.readouterr().out.count("--num_workers")
    if sleep:
        assert wait > 0.5 and warnings == 1  # once an epoch, naming the levers
    else:
        assert wait < 0.1 and warnings == 0


def test_profile_steps_and_peak_tflops_are_checked_in_one_line(tmp_path):
    for bad in ("5:3", "3", "a:b", "-1:2"):
        with pytest.raises(SystemExit, match=r"--profile_steps takes A:B"):
            cli_main(["pretrain", f"--profile_steps={bad}", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--peak_tflops must be above 0"):
        cli_main(["pretrain", "--peak_tflops", "0", "--output_dir", str(tmp_path)])
    assert not Path(tmp_path / "log.txt").exists()
