"""What the tests read of a run directory that another process is writing."""

from __future__ import annotations

from pathlib import Path

from semmae_jax import checkpoint


def committed_steps(directory: Path) -> list[int]:
    """The steps orbax has committed in `directory` (a step still being written is not one)."""
    if not directory.is_dir():
        return []
    checkpoints = checkpoint.RunCheckpoints(directory, create=False)
    try:
        return checkpoints.all_steps()
    finally:
        checkpoints.close()
