"""`python main.py launch -n N [--devices_per_process K] -- COMMAND [flags]`: N local processes of one
command joined by `jax.distributed` (`semmae_jax.runtime.launch` starts and supervises them)."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Sequence

from semmae_jax.runtime import launch as launch_lib
from semmae_jax.runtime.launch import free_port, heartbeat_timeout, start, stop, supervise


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="main.py launch", description=launch_lib.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4, help="fake CPU devices each (0: real devices)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before everything is stopped")
    parser.add_argument("--grace", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [flags] for every process")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- pretrain --epochs 1")
    signal.signal(signal.SIGTERM, _interrupted)  # a scheduler's stop reaches every process, as Ctrl-C does
    procs = start(command, args.num_processes, args.devices_per_process, args.port or free_port())
    try:
        code = supervise(procs, args.timeout, args.grace, heartbeat_timeout(command))
    except KeyboardInterrupt:
        stop(procs, args.grace)
        code = 130
    raise SystemExit(code)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
