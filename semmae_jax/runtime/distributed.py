"""Start-up of JAX's own multi-process runtime (`jax.distributed`).

Three ways in, tried in this order:
1. explicit flags, with jax.distributed's own names: `--coordinator_address HOST:PORT
   --num_processes N --process_id I`;
2. the environment, where JAX detects the cluster itself (SLURM with more than one
   task, Open MPI's `mpirun`, TPU pod slices, Kubernetes jobs);
3. otherwise a single process.

CPU runs use gloo collectives (the only cross-process CPU backend).

A dead peer (a machine failure, an OOM kill) ends every survivor within
`heartbeat_timeout_seconds` with one line (which process stopped answering, the last
complete checkpoint, that the same command resumes) and exit code `RETRY_EXIT_CODE`,
instead of waiting in a collective or dying in JAX's C++ fatal error. jax 0.10.2 offers no
way to keep its client from aborting on a peer's death: `jax.distributed.initialize` passes
no `missed_heartbeat_callback`, and one passed to `_jax.get_distributed_runtime_client`
cannot be called (the client hands it an `absl::Status`, which has no Python conversion:
`std::bad_cast`, abort); its recoverable mode (`jax_enable_recoverability`) keeps the
survivors alive but leaves the shutdown unsynchronised (the host of the service exits
first, the others abort). So JAX's heartbeat keeps its meaning with a longer timeout, and
`PeerWatch`, a side thread beating through JAX's key-value store, reaches the verdict first
and ends the process cleanly. The death of process 0, which hosts the service, is the
exception: the survivors' runtime aborts within a second of losing it, before anything in
Python can act; the launcher (`main.py launch`, `runtime/launch.py`) then reports it and
exits with the same code.

On a GPU, start-up also adds the project's default XLA flags (`GPU_XLA_FLAGS`) to
`XLA_FLAGS`: XLA reads that variable once, when the backend starts, so this is the one
moment they can be set. A flag that `XLA_FLAGS` already names keeps the user's value.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, MutableMapping

import jax
from jax._src import distributed as jax_distributed  # the client: jax.distributed exports no accessor
from tqdm import tqdm

# The XLA flags every job sets on a GPU (NVIDIA's JAX image sets the same): the latency-hiding
# scheduler overlaps collectives (and async copies) with compute. `bench/gpu.py` measures a
# step with and without them. Override any of them with XLA_FLAGS, e.g.
# XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false.
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
_CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")

# Environment variables whose presence means "launched as one of several processes".
_CLUSTER_HINTS = {
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
    "MEGASCALE_COORDINATOR_ADDRESS": bool,
}


def with_gpu_xla_flags(xla_flags: str, defaults: tuple[str, ...] = GPU_XLA_FLAGS) -> str:
    """`xla_flags` plus every default whose flag it does not set already (the given value wins)."""
    given = xla_flags.split()
    names = {flag.split("=")[0] for flag in given}
    return " ".join(given + [flag for flag in defaults if flag.split("=")[0] not in names])


def gpu_expected(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether JAX will start on an NVIDIA GPU: a CUDA plugin is installed and neither
    `JAX_PLATFORMS` nor an empty `CUDA_VISIBLE_DEVICES` rules it out. Answered without
    starting the backend, which would read XLA_FLAGS too early."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and not {"cuda", "gpu"} & set(platforms.lower().split(",")):
        return False
    if environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(importlib.util.find_spec(name) is not None for name in _CUDA_PLUGINS)


def apply_gpu_xla_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Add `GPU_XLA_FLAGS` to `XLA_FLAGS` when JAX will start on a GPU; returns the flags added.

    Call before anything touches a JAX device; afterwards XLA_FLAGS is no longer read.
    """
    if not gpu_expected(environ):
        return []
    old = environ.get("XLA_FLAGS", "")
    environ["XLA_FLAGS"] = with_gpu_xla_flags(old)
    return environ["XLA_FLAGS"].split()[len(old.split()):]


# The exit code of a process whose peer died: EX_TEMPFAIL of BSD's sysexits.h, "temporary
# failure, the user is invited to retry" (docs/multi-host.md: how SLURM and Kubernetes are told).
RETRY_EXIT_CODE = 75
DEFAULT_HEARTBEAT_TIMEOUT = 60  # seconds
_JAX_MARGIN = 30  # seconds JAX's own heartbeat timeout exceeds ours: PeerWatch's verdict comes first
_PREFIX = "semmae_jax/"  # the key-value store's keys of PeerWatch
_ALIVE = f"{_PREFIX}alive/"  # one beat per process, rewritten every poll
_LEFT = f"{_PREFIX}left/"  # the processes that are exiting on their own


def _cluster_detected() -> bool:
    return any(name in os.environ and check(os.environ[name]) for name, check in _CLUSTER_HINTS.items())


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT,
    initialization_timeout: int = 300,
) -> bool:
    """Join the job's processes if there are several; True when running multi-process.

    Call before anything touches a JAX device (it also sets the GPU's default XLA flags,
    `apply_gpu_xla_flags`). Safe to call twice.
    """
    apply_gpu_xla_flags()
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("give all three of --coordinator_address, --num_processes and --process_id, or none")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if all(v is not None for v in explicit) and num_processes == 1:
        return False
    if not (all(v is not None for v in explicit) or _cluster_detected()):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds + _JAX_MARGIN,
    )
    PeerWatch(jax_distributed.global_state.client, jax.process_index(), jax.process_count(),
              heartbeat_timeout_seconds).start()
    return True


def _no_checkpoint_yet() -> str:
    return "no checkpoint of this run was complete yet"


_checkpoint_hint: Callable[[], str] = _no_checkpoint_yet


def describe_checkpoints_with(hint: Callable[[], str]) -> None:
    """Name the run's last complete checkpoint, for the line a dead peer ends the process with
    (the training loop registers its checkpoints here; `hint` runs on the watch's thread)."""
    global _checkpoint_hint
    _checkpoint_hint = hint


class PeerWatch:
    """A side thread that ends this process cleanly when a peer stops answering.

    Every `poll_seconds` it writes a beat under its own key in JAX's key-value store
    (`_ALIVE`) and reads every process's: a peer whose beat has not changed for the heartbeat
    timeout, and that did not say it was exiting (`_LEFT`, set at interpreter exit), is dead:
    one line, exit `RETRY_EXIT_CODE`, whatever the main thread is blocked in (a collective, a
    checkpoint barrier). JAX's own heartbeat is given a longer timeout (`_JAX_MARGIN`), so
    this verdict comes first. A lost service (process 0 died) is reported the same way when
    this thread notices it first. At the interpreter's exit the watch says so and is joined
    before JAX shuts its runtime down: a thread still inside a call into the runtime when
    Python finalizes is unwound through C++ and aborts the process ("FATAL: exception not
    rethrown") after its work is done.
    """

    def __init__(self, client: object, process_id: int, num_processes: int, heartbeat_timeout_seconds: int,
                 poll_seconds: float = 1.0) -> None:
        self._client, self._me, self._count = client, process_id, num_processes
        self._timeout, self._poll = heartbeat_timeout_seconds, poll_seconds
        self._exiting = False
        self._thread = threading.Thread(target=self._run, name="semmae-peer-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self._leave)  # after jax's own atexit hook, so it runs before jax.distributed.shutdown

    def _run(self) -> None:
        peers = [i for i in range(self._count) if i != self._me]
        beats: dict[int, str | None] = dict.fromkeys(peers)
        changed = dict.fromkeys(peers, time.monotonic())
        for beat in itertools.count():
            if self._exiting:
                return
            try:
                self._client.key_value_set(f"{_ALIVE}{self._me}", str(beat), allow_overwrite=True)
                keys = dict(self._client.key_value_dir_get(_PREFIX))
            except Exception as error:  # any failure to reach the service: it is gone (or shut down at exit)
                if not self._exiting:
                    self._end([0], f"the coordination service it hosts is unreachable ({_first_line(error)})")
                return
            now = time.monotonic()
            for peer in peers:
                if keys.get(f"{_ALIVE}{peer}") != beats[peer]:
                    beats[peer], changed[peer] = keys.get(f"{_ALIVE}{peer}"), now
            silent = [peer for peer in peers if now - changed[peer] > self._timeout and f"{_LEFT}{peer}" not in keys]
            if silent:
                self._end(silent, f"no heartbeat for {self._timeout} s")
            time.sleep(self._poll)

    def _end(self, missing: list[int], why: str) -> None:
        names = ", ".join(map(str, missing))
        with contextlib.suppress(Exception):  # this exit is no death to the other survivors' watches
            self._client.key_value_set(f"{_LEFT}{self._me}", "1", allow_overwrite=True)
        # Through tqdm: an open progress bar is cleared first, so the line starts a line of its own (a
        # plain print lands after the bar's half-written line). No lock: this thread must never wait.
        tqdm.write(f"dead host: process {names} of {self._count} stopped answering ({why}); this is process "
                   f"{self._me}; {_checkpoint_hint()}; the same command resumes from it; exiting with code "
                   f"{RETRY_EXIT_CODE} (EX_TEMPFAIL: retry)", file=sys.stderr, nolock=True)
        sys.stderr.flush()
        os._exit(RETRY_EXIT_CODE)

    def _leave(self) -> None:
        """At interpreter exit: say so, so that the peers' watches take this process's silence for an
        exit, and end the watch (its last poll at most `poll_seconds` away)."""
        self._exiting = True
        with contextlib.suppress(Exception):  # the service is gone: the watch reports it (or has)
            self._client.key_value_set(f"{_LEFT}{self._me}", "1", allow_overwrite=True)
        self._thread.join(timeout=self._poll + 10)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def is_primary() -> bool:
    """Process 0 prints progress and writes logs, TensorBoard and pictures."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here for the others (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
