"""A preemption notice, acted on by every process of a run at the same step.

Clusters give notice before they take a job's machines (SIGTERM from a scheduler, a spot
or preemptible VM's notice), often to one host first, or to all hosts at different steps.
If each process acted on its own notice, the one that got it would enter orbax's
collective save while the others kept stepping: the run hangs, or hosts save different
steps. With several processes, JAX's coordination service catches SIGTERM in any of them,
spreads the notice to all, and picks a step every process reaches; orbax's
`reached_preemption(step)`, asked at every step by every process, is True on all of them
at that step, which they save as one checkpoint before stopping. A single process has no
coordination service: its own SIGTERM handler is the notice, acted on at the next step.
"""

from __future__ import annotations

import signal
from typing import Any

import jax

from semmae_jax.checkpoint import RunCheckpoints


class Preemption:
    """`reached(step)`: save at `step` and stop? Asked after every step, in every process."""

    def __init__(self, checkpoints: RunCheckpoints, start_step: int) -> None:
        self._checkpoints = checkpoints
        self._coordinated = jax.process_count() > 1  # JAX's runtime owns SIGTERM: leave its handler in place
        self._signalled = False
        self._previous = None if self._coordinated else signal.signal(signal.SIGTERM, self._handle)
        if self._coordinated:
            # The sync protocol picks (largest step any process last reported) + 1; reporting the step a
            # resumed run starts at keeps a notice before its first step from picking a step already past.
            checkpoints.reached_preemption(start_step)

    def _handle(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def reached(self, step: int) -> bool:
        if self._coordinated:
            return self._checkpoints.reached_preemption(step)
        return self._signalled

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
