"""Run logs: TensorBoard scalars and images (also as PNGs), and the original's JSON-lines `log.txt`.

Only the primary process writes; on the others every method is a no-op, so callers
need no `if process_index == 0` of their own. The directories may be any `etils.epath`
location (`gs://bucket/run`): the log and pictures are written through epath, TensorBoard
through TensorFlow's file systems.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from semmae_jax.runtime.distributed import is_primary
from semmae_jax.runtime.storage import PathLike, output_path, save_png


def epoch_lines(output_dir: PathLike) -> list[dict[str, Any]]:
    """The epoch records of a run's `log.txt`, in order (its goodput records, which have no epoch, left out)."""
    text = (output_path(output_dir) / "log.txt").read_text()
    lines = (json.loads(line) for line in text.splitlines() if line.strip())
    return [line for line in lines if "epoch" in line]


class RunLog:
    """`log.txt` in `output_dir` (one JSON object per epoch, and a goodput record at the end of each
    process's part of the run) and TensorBoard in `log_dir`."""

    def __init__(self, output_dir: PathLike, log_dir: PathLike | None = None) -> None:
        self.enabled = is_primary()
        self.output_dir = output_path(output_dir)
        self._writer = None
        if self.enabled:
            from flax.metrics.tensorboard import SummaryWriter  # imports TensorFlow: only where logging happens

            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(output_path(log_dir, "--log_dir") if log_dir else self.output_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for name, value in values.items():
                self._writer.scalar(name, float(value), step)
            self._writer.flush()

    def picture(self, step: int, epoch: int, name: str, image: np.ndarray) -> None:
        """A uint8 HWC picture as `<name>_epochNNNN.png` in the output dir and as a TensorBoard image."""
        if self._writer is not None:
            save_png(self.output_dir / f"{name}_epoch{epoch:04d}.png", image)
            self._writer.image(name, image, step)
            self._writer.flush()

    def epoch_line(self, values: dict[str, Any]) -> None:
        if self.enabled:
            with (self.output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(values) + "\n")

    def print(self, *args: Any) -> None:
        if self.enabled:
            print(*args, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
