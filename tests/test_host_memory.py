"""The command line's restart with malloc on transparent huge pages (`semmae_jax.runtime.host_memory`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from semmae_jax import cli
from semmae_jax.runtime import host_memory

ROOT = Path(__file__).resolve().parent.parent

# A program that restarts as the command line does, then takes 256 MiB from malloc and writes it, as
# XLA:CPU does with a step's buffers (NumPy is no stand-in: it asks for huge pages itself), and prints
# its tunables and how much of its memory is on huge pages.
CHILD = """
import ctypes, os, re
from pathlib import Path
from semmae_jax.runtime import host_memory
host_memory.restart_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
buffer = libc.malloc(256 << 20)
ctypes.memset(buffer, 1, 256 << 20)
rollup = Path("/proc/self/smaps_rollup").read_text()
print(os.environ.get("GLIBC_TUNABLES", ""))
print(int(re.search(r"AnonHugePages:\\s+(\\d+)", rollup).group(1)))
"""


def run_child(tunables: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=300)
    seen_tunables, huge_kib = out.stdout.split("\n")[:2]
    return seen_tunables, int(huge_kib)


def test_tunables_gain_huge_pages_unless_named_already():
    assert host_memory.with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert host_memory.with_huge_pages("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert host_memory.with_huge_pages("glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2") is None


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="reads Linux's /proc/self/smaps_rollup")
def test_restart_puts_large_allocations_on_huge_pages():
    tunables, huge_kib = run_child(None)
    if not host_memory.huge_pages_available():  # e.g. musl, old glibc, THP off: nothing changes
        assert (tunables, huge_kib) == ("", 0)
        return
    assert tunables == "glibc.malloc.hugetlb=1"
    assert huge_kib >= 128 << 10  # at least half the buffer on 2 MiB pages
    opted_out, opted_out_kib = run_child("glibc.malloc.hugetlb=0")
    assert opted_out == "glibc.malloc.hugetlb=0"
    if "[madvise]" in host_memory.THP_SETTING.read_text():  # with [always] the kernel gives them anyway
        assert opted_out_kib == 0


def test_only_a_programs_own_command_line_restarts(monkeypatch):
    restarts = []
    monkeypatch.setattr(host_memory, "restart_with_huge_pages", lambda: restarts.append(True))
    monkeypatch.setattr(sys, "argv", ["main.py", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert restarts == [True]


def test_a_runs_log_says_what_malloc_runs_on(monkeypatch):
    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: True)
    assert host_memory.describe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}).startswith("malloc on huge pages")
    assert host_memory.describe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}).startswith("malloc on 4 KiB pages")
    assert host_memory.describe({}).startswith("malloc on 4 KiB pages")
    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: False)
    assert host_memory.describe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}).startswith("malloc on 4 KiB pages")
