"""`python main.py launch -n N [--devices_per_process K] -- COMMAND [flags]`.

Starts N local processes of `python -m semmae_jax COMMAND` (what `main.py` runs), joined by JAX's own multi-process runtime
(`jax.distributed`, coordinator on 127.0.0.1, gloo collectives on CPU), each with K fake
CPU devices unless `--devices_per_process 0`. It is how this project tests multi-host
code on one machine; on a cluster the scheduler starts the processes instead (see the
docs/multi-host.md's launch recipes). The launcher supervises: if one process fails, the others are
stopped (SIGTERM, then SIGKILL after a grace period) and the launcher exits with that
process's code; `--timeout` bounds the whole run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


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


def supervise(procs: Sequence[subprocess.Popen], timeout: float | None, grace: float) -> int:
    """Wait for all; the first failure (or the timeout) stops the rest. Returns the exit code."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            index, code = failed[0]
            print(f"launch: process {index} exited with code {code}; stopping the others", file=sys.stderr, flush=True)
            stop(procs, grace)
            return code if code > 0 else 128 - code
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(f"launch: timeout after {timeout:.0f} s; stopping all processes", file=sys.stderr, flush=True)
            stop(procs, grace)
            return 124
        time.sleep(0.2)
