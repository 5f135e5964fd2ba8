"""`python main.py launch -n N [--devices_per_process K] -- COMMAND [flags]`.

Starts N local processes of `python -m semmae_jax COMMAND` (what `main.py` runs), joined by JAX's own multi-process runtime
(`jax.distributed`, coordinator on 127.0.0.1, gloo collectives on CPU), each with K fake
CPU devices unless `--devices_per_process 0`. It is how this project tests multi-host
code on one machine; on a cluster the scheduler starts the processes instead (see the
docs/multi-host.md's launch commands). The launcher supervises: if one process fails, the others are
stopped (SIGTERM, then SIGKILL after a grace period) and the launcher exits with that
process's code; `--timeout` bounds the whole run.

A process killed by a signal (kill -9, the kernel's OOM killer) is a dead host, the case a
cluster meets when a machine fails: the others are left to notice it themselves within the
heartbeat timeout (`distributed.PeerWatch`: one line, exit `RETRY_EXIT_CODE`) and only then
stopped, and the launcher exits with `RETRY_EXIT_CODE` too: the same command resumes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from semmae_jax.runtime.distributed import DEFAULT_HEARTBEAT_TIMEOUT, RETRY_EXIT_CODE

_NOTICE_MARGIN = 20.0  # seconds, beyond the heartbeat timeout, for the survivors to notice a dead peer and exit


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_command(command: Sequence[str], index: int, count: int, port: int) -> list[str]:
    return [sys.executable, "-m", "semmae_jax", *command, "--coordinator_address", f"127.0.0.1:{port}",
            "--num_processes", str(count), "--process_id", str(index)]


def start(command: Sequence[str], count: int, devices_per_process: int, port: int) -> list[subprocess.Popen]:
    """Start `count` copies of `command` joined by jax.distributed on localhost:`port`."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)  # where `semmae_jax` is imported from: a checkout or site-packages
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    if devices_per_process:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices_per_process}"
        env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen(process_command(command, i, count, port), env=env) for i in range(count)]
    for i, proc in enumerate(procs):
        print(f"launch: process {i} pid {proc.pid}", flush=True)
    return procs


def stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM the live ones (they checkpoint if they can), SIGKILL what is left after `grace`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def heartbeat_timeout(command: Sequence[str]) -> float:
    """The `--heartbeat_timeout_seconds` that `command` gives its processes (or the flag's default)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--heartbeat_timeout_seconds", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT)
    return parser.parse_known_args(command)[0].heartbeat_timeout_seconds


def supervise(procs: Sequence[subprocess.Popen], timeout: float | None, grace: float,
              heartbeat: float = DEFAULT_HEARTBEAT_TIMEOUT) -> int:
    """Wait for all; the first failure (or the timeout) stops the rest. Returns the exit code:
    `RETRY_EXIT_CODE` after a dead host (a process killed by a signal, or one that saw its peer die)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            index, code = failed[0]
            if code < 0 or code == RETRY_EXIT_CODE:
                return _dead_host(procs, index, code, heartbeat, grace)
            print(f"launch: process {index} exited with code {code}; stopping the others", file=sys.stderr, flush=True)
            stop(procs, grace)
            return code
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(f"launch: timeout after {timeout:.0f} s; stopping all processes", file=sys.stderr, flush=True)
            stop(procs, grace)
            return 124
        time.sleep(0.2)


def _dead_host(procs: Sequence[subprocess.Popen], index: int, code: int, heartbeat: float, grace: float) -> int:
    """A process died (or saw a peer die): give the others the heartbeat timeout to notice and exit on
    their own, stop whatever is left, and say that the same command resumes."""
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    print(f"launch: process {index} {how}: a dead host; the others stop within the heartbeat timeout "
          f"({heartbeat:.0f} s)", file=sys.stderr, flush=True)
    deadline = time.monotonic() + heartbeat + _NOTICE_MARGIN
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop(procs, grace)
    codes = ", ".join(f"{i}: {proc.returncode}" for i, proc in enumerate(procs))
    errors = [proc.returncode for proc in procs if proc.returncode > 0 and proc.returncode != RETRY_EXIT_CODE]
    if errors:  # a process failed on its own (its line says why): no retry will mend that
        print(f"launch: exit codes {codes}; exiting with code {errors[0]}", file=sys.stderr, flush=True)
        return errors[0]
    print(f"launch: dead host (exit codes {codes}); the same command resumes from the run's newest complete "
          f"checkpoint; exiting with code {RETRY_EXIT_CODE} (EX_TEMPFAIL: retry)", file=sys.stderr, flush=True)
    return RETRY_EXIT_CODE
