"""Host memory: the allocator every command starts with (glibc's malloc on transparent huge
pages), and how much is free (`available_host_bytes`).

XLA:CPU takes a step's temporary buffers (about 1.8 GB for MAE ViT-B/16 at batch 8) from
malloc and hands them back after the step. glibc serves allocations that large with fresh
`mmap`ed memory and returns it on free, so every step first-touches its buffers again:
about 470,000 page faults of 4 KiB per step on a 2-core CPU, 0.9 s of kernel time. With
glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35 and later) malloc asks the kernel for
transparent huge pages instead: 2 MiB pages, about 1,700 faults per step
(docs/benchmarks.md measures the step with and without it).

glibc reads `GLIBC_TUNABLES` once, when a process starts, so the command line sets it by
executing itself again before anything else runs (as Intel's `ipexrun` launcher does for
its allocator). A `GLIBC_TUNABLES` that already names `glibc.malloc.hugetlb` is left as
it is: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns this off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def parse_tunables(tunables: str) -> dict[str, str]:
    """'glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2' -> {name: value}."""
    return dict(item.partition("=")[::2] for item in tunables.split(":") if item)


def with_huge_pages(tunables: str) -> str | None:
    """`GLIBC_TUNABLES` with malloc's huge pages turned on, or None where it names them already."""
    if TUNABLE in parse_tunables(tunables):
        return None
    return ":".join([*filter(None, tunables.split(":")), f"{TUNABLE}=1"])


def huge_pages_available() -> bool:
    """Linux with glibc >= 2.35 (the first with the tunable) and transparent huge pages not
    turned off by the kernel's settings."""
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc" or not version:
        return False
    major, minor = (int(part) for part in version.split(".")[:2])
    thp = THP_SETTING.read_text() if THP_SETTING.is_file() else "[never]"
    return (major, minor) >= (2, 35) and "[never]" not in thp


def restart_with_huge_pages(environ: MutableMapping[str, str] = os.environ) -> None:
    """Execute this process's own command line again with malloc on huge pages, once; a no-op
    where they are unavailable or `GLIBC_TUNABLES` already decides. Call first thing in a program."""
    tunables = with_huge_pages(environ.get("GLIBC_TUNABLES", ""))
    if tunables is None or not huge_pages_available():
        return
    environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)


def describe(environ: MutableMapping[str, str] = os.environ) -> str:
    """What this process's malloc runs on, for a run's log: 'huge pages' or '4 KiB pages'."""
    on = parse_tunables(environ.get("GLIBC_TUNABLES", "")).get(TUNABLE, "0") != "0" and huge_pages_available()
    return f"malloc on {'huge' if on else '4 KiB'} pages (GLIBC_TUNABLES={environ.get('GLIBC_TUNABLES', '')!r})"


def available_host_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's estimate of memory available to a new allocation (MemAvailable), or None."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
