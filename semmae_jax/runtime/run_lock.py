"""One writer per run directory: a lock file holding the writer's host and pid.

Two runs on one `--output_dir` (a requeued cluster job overlapping its predecessor, a
command started twice) would resume from each other's checkpoints and interleave their
logs. The primary process takes `RUN.lock` in the output directory at start, by an
exclusive create (which works on the shared file systems clusters use, unlike `flock`),
and removes it at exit. A second run is refused naming the holder; a lock whose holder is
dead on this host (a killed job) is taken over with a warning. A holder on another host
cannot be checked from here: the message says how to clear it.

On object storage (`gs://...`, any non-local `etils.epath` location) there is no exclusive
create: the lock is written after checking that none exists, which refuses a second run
started later but not one started in the same instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

from etils import epath

from semmae_jax.runtime.storage import PathLike, is_local, output_path

LOCK_NAME = "RUN.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # half-written or unreadable: treated as stale below only if its writer is gone


def _try_create(path: epath.Path, me: dict) -> bool:
    if not is_local(path):
        if path.exists():
            return False
        path.write_text(json.dumps(me))
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


@contextlib.contextmanager
def run_lock(directory: PathLike, enabled: bool = True, warn=print) -> Iterator[None]:
    """Hold the lock of `directory` for the duration of the block (a no-op where `enabled` is False)."""
    if not enabled:
        yield
        return
    directory = output_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not _try_create(path, me):
        holder = _holder(path)
        if holder.get("host") == me["host"] and holder.get("pid") and not _alive(int(holder["pid"])):
            warn(f"warning: {path} was held by pid {holder['pid']} on this host, which is gone; taking it over")
            path.unlink(missing_ok=True)
        if not _try_create(path, me):
            holder = _holder(path)
            raise RuntimeError(
                f"{directory} is in use by another run (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
                f"since {holder.get('since', '?')}): one run per --output_dir; if that run is gone, delete {path}")
    try:
        yield
    finally:
        if _holder(path).get("pid") == me["pid"] and _holder(path).get("host") == me["host"]:
            path.unlink(missing_ok=True)
