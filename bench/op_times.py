"""Where a jitted step's time goes: a `jax.profiler` trace of a few calls, summed per kind of op.

    python bench/step.py --model mae_vit_base_patch16 --batch 8 --trace /tmp/step_trace

XLA names each op it runs after the HLO instruction (`ynn_fusion.535`, `copy_bitcast_fusion.12`,
`wrapped_is-finite`); the kind is the name without its number. Host-side spans (the thunk
executor, Python frames, thread-pool waits) are left out: they contain the ops. Durations are
summed over the worker threads, so shares are of op time, not of wall time. The trace directory
also opens in TensorBoard's profile plugin and Perfetto, op by op.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

_NUMBER = re.compile(r"(\.\d+)+$")
_OP = re.compile(r"^[a-z][\w\-]*(\.\d+)*$")  # HLO instruction names; host spans are capitalised or `$frames`


@dataclasses.dataclass(frozen=True)
class OpKind:
    kind: str
    ms_per_call: float
    ops_per_call: float
    share: float  # of the summed op time


def trace_calls(call: Callable[[], Any], calls: int, directory: str | Path) -> Path:
    """Trace `calls` calls of `call` (compiled and warmed up before) into `directory`; the Perfetto file."""
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        for _ in range(calls):
            result = call()
        jax.block_until_ready(result)
    return max(Path(directory).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)


def op_kinds(perfetto_file: str | Path, calls: int) -> list[OpKind]:
    """The ops of a trace grouped by kind, most time first, per call."""
    events = json.loads(gzip.decompress(Path(perfetto_file).read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    micros: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and _OP.match(event.get("name", "")):
            kind = _NUMBER.sub("", event["name"])
            micros[kind] += event.get("dur", 0)
            counts[kind] += 1
    total = sum(micros.values()) or 1
    return [OpKind(kind, us / 1e3 / calls, counts[kind] / calls, us / total) for kind, us in micros.most_common()]


def table(kinds: list[OpKind], shown: int = 12) -> str:
    """The first `shown` kinds as text lines, then the rest in one line."""
    lines = [f"{k.ms_per_call:9.1f} ms  {100 * k.share:5.1f} %  {k.ops_per_call:6.0f} ops  {k.kind}" for k in kinds[:shown]]
    rest = kinds[shown:]
    if rest:
        lines.append(f"{sum(k.ms_per_call for k in rest):9.1f} ms  {100 * sum(k.share for k in rest):5.1f} %  "
                     f"{sum(k.ops_per_call for k in rest):6.0f} ops  ({len(rest)} other kinds)")
    return "\n".join(["op time per step, by kind of XLA op (summed over threads):", *lines])
