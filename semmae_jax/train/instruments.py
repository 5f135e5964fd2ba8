"""Where a training run's time goes: step time, MFU, input wait, device memory, goodput, traces.

The loop (`loop.Trainer`) calls one `Instruments` at a few places; everything it measures
comes from one stopwatch that is always in exactly one phase of the run:

    startup (restore) ... first batch (input wait), compile -> steps (input wait, save, eval) ...

From the first step on, the loop's own time is productive steps (dispatch, and the host
syncs that wait for the device) unless it waits for input, saves or evaluates. So the parts
of the goodput record add up to the wall time by construction, and a logging window's
figures are differences of the same clock:

* step time = (time in steps + time waiting for input) / steps of the window: the wall time
  of a step as the run sees it (compilation, checkpoint saves and evaluation left out);
* images/s = global batch / step time; model TFLOP/s = model FLOPs of a step (the analytic
  count of `semmae_jax.flops`) / step time; MFU = that over the peak of all devices;
* input wait = the share of that time the loop spent in `next(batches)`, blocked on the
  input pipeline (with asynchronous dispatch, a fast pipeline hands over the next batch
  while the device still runs the last step, and the wait is near zero);
* device memory in use and its peak, where the backend reports them (GPUs, TPUs).

Compilation is its own phase because the step is compiled ahead of its first call
(`jit(...).lower(...).compile()`), which times tracing plus XLA's compilation exactly.
`--profile_steps A:B` wraps the steps after step A up to step B in a `jax.profiler` trace
under the log directory (`plugins/profile/<run>/`, TensorBoard's profile plugin layout,
plus a Perfetto `perfetto_trace.json.gz`); starting and writing it is the phase "trace".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from semmae_jax import flops
from semmae_jax.runtime.distributed import is_primary
from semmae_jax.runtime.run_log import RunLog
from semmae_jax.train import step_memory

PARTS = {"startup": "start-up", "compile": "compilation", "restore": "restore", "steps": "productive steps",
         "input_wait": "input wait", "save": "checkpoint saves", "eval": "evaluation", "trace": "tracing"}
INPUT_WAIT_WARNING = 0.10  # share of a window's step time


class Stopwatch:
    """Wall time split into the run's phases (`PARTS`); exactly one phase runs at any time."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.start = clock()
        self._phase, self._since = "startup", self.start
        self._seconds = dict.fromkeys(PARTS, 0.0)

    def switch(self, phase: str) -> str:
        """Close the running phase and start `phase`; returns the phase that ran."""
        now, previous = self._clock(), self._phase
        self._seconds[previous] += now - self._since
        self._phase, self._since = phase, now
        return previous

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """`name` runs inside the block; the phase before it resumes after."""
        previous = self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)

    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far, the running one included."""
        return {**self._seconds, self._phase: self._seconds[self._phase] + self._clock() - self._since}

    def wall(self) -> float:
        return self._clock() - self.start


class Profile:
    """A `jax.profiler` trace of steps A..B-1 (0-based; "after step A up to step B" as the logs count)."""

    def __init__(self, steps: tuple[int, int] | None, directory: str, enabled: bool) -> None:
        self.steps, self.directory = (steps if enabled else None), directory
        self.active = False

    def starts_at(self, step: int) -> bool:
        return bool(self.steps) and not self.active and self.steps[0] <= step < self.steps[1]

    def stops_after(self, step: int) -> bool:
        return self.active and step + 1 >= self.steps[1]

    def start(self) -> None:
        jax.profiler.start_trace(self.directory, create_perfetto_trace=True)  # local or gs://
        self.active = True

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.steps = False, None


def device_memory() -> dict[str, float]:
    """GiB in use and at peak on this process's first device; empty where the backend does not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    names = {"bytes_in_use": "device_memory_gib", "peak_bytes_in_use": "device_memory_peak_gib"}
    return {name: stats[key] / 2**30 for key, name in names.items() if key in stats}


class Instruments:
    """What the loop measures about itself; see the module docstring.

    `flops_per_image`: model FLOPs of one image's training step (None: no TFLOP/s, no MFU);
    `peak_tflops`: one device's peak (None: no MFU).
    """

    def __init__(self, log: RunLog, images_per_step: int, flops_per_image: float | None,
                 peak_tflops: float | None, profile: Profile, watch: Stopwatch | None = None) -> None:
        self.log, self.images_per_step = log, images_per_step
        self.flops_per_image, self.peak_tflops = flops_per_image, peak_tflops
        self.devices = jax.device_count()
        self.profile = profile
        self.watch = watch or Stopwatch()
        self.steps = 0  # steps run by this process
        self.done: int | None = None  # the run's step count after the last step run here
        self._compiled: Any = None
        self._window = self._epoch = (self.watch.seconds(), 0)
        self._warned_epoch = -1

    @classmethod
    def for_run(cls, config: Any, log: RunLog, images_per_step: int, flops_per_image: float | None,
                watch: Stopwatch) -> Instruments:
        """From the run flags (`--profile_steps`, `--profile_all_processes`, `--peak_tflops`)."""
        peak = config.peak_tflops or flops.peak_tflops(jax.devices()[0].device_kind)
        profile = Profile(config.profile_range, str(config.log_dir or config.output_dir),
                          is_primary() or config.profile_all_processes)
        return cls(log, images_per_step, flops_per_image, peak, profile, watch)

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.watch.phase(name)

    def next_batch(self, batches: Iterator[Any]) -> Any:
        """The next batch; the time blocked on the input pipeline is input wait."""
        with self.watch.phase("input_wait"):
            return next(batches)

    def step(self, step_fn: Any, state: Any, batch: Any, index: int) -> tuple[Any, Any]:
        """Run step `index` (0-based, over the whole run); compiled ahead of its first call, after
        which the loop's time counts as productive steps."""
        if self._compiled is None:
            self.watch.switch("compile")
            self._compiled = step_fn.lower(state, batch).compile()
            step_memory.check_fits(self._compiled)  # refused here, before the first step runs
            self.watch.switch("steps")
        if self.profile.starts_at(index):
            with self.watch.phase("trace"):
                self.profile.start()
        state, metrics = self._compiled(state, batch)
        if self.profile.stops_after(index):
            jax.block_until_ready(state)  # the traced steps' device work, not only their dispatch
            with self.watch.phase("trace"):
                self.profile.stop()
        self.steps, self.done = self.steps + 1, index + 1
        return state, metrics

    def _figures(self, mark: tuple[dict[str, float], int]) -> dict[str, float]:
        """Step time, images/s, model TFLOP/s, MFU and input wait since `mark` (seconds, steps)."""
        (before, steps_before), now = mark, self.watch.seconds()
        steps = self.steps - steps_before
        busy = sum(now[p] - before[p] for p in ("steps", "input_wait"))
        if steps == 0 or busy <= 0:
            return {}
        step_time = busy / steps
        figures = {"step_time_s": step_time, "images_per_sec": self.images_per_step / step_time,
                   "input_wait": (now["input_wait"] - before["input_wait"]) / busy}
        if self.flops_per_image:
            step_flops = self.flops_per_image * self.images_per_step
            figures["model_tflops"] = step_flops / step_time / 1e12
            if self.peak_tflops:
                figures["mfu"] = flops.mfu(step_flops, step_time, self.peak_tflops, self.devices)
        return figures

    def window(self, epoch: int) -> dict[str, float]:
        """The figures of the steps since the last window (and device memory); warns once an epoch
        when input wait exceeds `INPUT_WAIT_WARNING` of the window."""
        figures = {**self._figures(self._window), **device_memory()}
        self._window = (self.watch.seconds(), self.steps)
        wait = figures.get("input_wait", 0.0)
        if wait > INPUT_WAIT_WARNING and epoch != self._warned_epoch:
            self._warned_epoch = epoch
            self.log.print(f"input wait: {wait:.0%} of the last steps' time went to waiting for the next batch; "
                           "more decoding threads (--num_workers), a packed copy of the images (main.py prepare) "
                           "or smaller stored images would feed the device faster")
        return figures

    def epoch(self) -> dict[str, float]:
        """The figures of the steps since the last call (one epoch, or its resumed part)."""
        figures = self._figures(self._epoch)
        self._epoch = (self.watch.seconds(), self.steps)
        return figures

    def shown(self, figures: dict[str, float]) -> dict[str, str]:
        """The progress bar's share of a window's figures."""
        shown = {"step": f"{figures['step_time_s'] * 1e3:.0f}ms"} if "step_time_s" in figures else {}
        if "mfu" in figures:
            shown["mfu"] = f"{figures['mfu']:.1%}"
        if "input_wait" in figures:
            shown["wait"] = f"{figures['input_wait']:.0%}"
        return shown

    def goodput(self) -> dict[str, float]:
        """Seconds per phase, the wall time and productive steps' share of it."""
        seconds, wall = self.watch.seconds(), self.watch.wall()
        return {**{f"{part}_s": value for part, value in seconds.items()}, "wall_s": wall,
                "goodput": seconds["steps"] / wall}

    def finish(self) -> dict[str, float]:
        """The run's (or this resumed part's) goodput: one line, a `log.txt` record, TensorBoard."""
        with self.watch.phase("trace"):
            self.profile.stop()  # a run that ended inside the traced steps
        record = self.goodput()
        parts = ", ".join(f"{label} {record[f'{part}_s']:.1f} s" for part, label in PARTS.items())
        self.log.print(f"goodput {record['goodput']:.1%} of {record['wall_s']:.1f} s wall time "
                       f"({self.steps} steps): {parts}")
        self.log.epoch_line({"goodput": record, "step": self.done})
        self.log.scalars(self.done or 0, {f"goodput/{name}": value for name, value in record.items()})
        return record
