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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

_NUMBER = re.compile(r"(\.\d+)+$")
_OP = re.compile(r"^[a-z][\w\-]*(\.\d+)*$")  # HLO instruction names; host spans are capitalised or `$frames`


MATMULS = ("ynn_fusion", "xnn_fusion", "onednn_fusion", "dot_general", "dot", "convolution")  # XLA:CPU's matmul ops
WALL_STATES = ("matmuls only", "matmuls beside other ops", "one other op only", "other ops side by side", "no op")


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


def op_spans(perfetto_file: str | Path) -> list[tuple[float, float, str]]:
    """(start µs, end µs, kind) of every XLA op in a trace, host spans left out."""
    events = json.loads(gzip.decompress(Path(perfetto_file).read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    return [(e.get("ts", 0), e.get("ts", 0) + e.get("dur", 0), _NUMBER.sub("", e["name"])) for e in events
            if e.get("ph") == "X" and _OP.match(e.get("name", ""))]


def op_kinds(perfetto_file: str | Path, calls: int) -> list[OpKind]:
    """The ops of a trace grouped by kind, most time first, per call."""
    micros: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for start, end, kind in op_spans(perfetto_file):
        micros[kind] += end - start
        counts[kind] += 1
    total = sum(micros.values()) or 1
    return [OpKind(kind, us / 1e3 / calls, counts[kind] / calls, us / total) for kind, us in micros.most_common()]


def _stretches(perfetto_file: str | Path) -> Iterator[tuple[float, collections.Counter[str]]]:
    """(µs, how many ops of each kind run) for each stretch of a trace between two op starts or ends,
    from the first op to the last. The counter is the same object throughout: read it at once."""
    edges = sorted((t, +1 if i == 0 else -1, kind) for start, end, kind in op_spans(perfetto_file)
                   for i, t in enumerate((start, end)))
    running: collections.Counter[str] = collections.Counter()
    last = edges[0][0] if edges else 0.0
    for t, change, kind in edges:
        yield t - last, running
        running[kind] += change
        last = t


def wall_split(perfetto_file: str | Path, calls: int, matmuls: tuple[str, ...] = MATMULS) -> dict[str, float]:
    """Wall-clock ms per call by what was running: matmuls only, matmuls beside other ops, one
    other op alone, several other ops side by side, nothing (between the first op and the last).
    Op time summed over threads cannot say whether a core sat idle; this can: while one
    elementwise op runs alone, every other core waits (XLA:CPU splits few of them over threads)."""
    wall: collections.Counter[str] = collections.Counter()
    for micros, running in _stretches(perfetto_file):
        matmul = sum(n for kind, n in running.items() if kind in matmuls)
        other = sum(running.values()) - matmul
        if matmul:
            state = "matmuls beside other ops" if other else "matmuls only"
        else:
            state = {0: "no op", 1: "one other op only"}.get(other, "other ops side by side")
        wall[state] += micros
    return {state: wall[state] / 1e3 / calls for state in WALL_STATES}


def alone_by_kind(perfetto_file: str | Path, calls: int, matmuls: tuple[str, ...] = MATMULS) -> list[tuple[str, float]]:
    """(kind, ms per call) for the time one op of each kind other than a matmul ran with nothing
    beside it, most first: which ops leave the other cores idle."""
    alone: collections.Counter[str] = collections.Counter()
    for micros, running in _stretches(perfetto_file):
        if sum(running.values()) == 1:
            (kind,) = (kind for kind, n in running.items() if n)
            if kind not in matmuls:
                alone[kind] += micros
    return [(kind, micros / 1e3 / calls) for kind, micros in alone.most_common()]


def table(kinds: list[OpKind], shown: int = 12) -> str:
    """The first `shown` kinds as text lines, then the rest in one line."""
    lines = [f"{k.ms_per_call:9.1f} ms  {100 * k.share:5.1f} %  {k.ops_per_call:6.0f} ops  {k.kind}" for k in kinds[:shown]]
    rest = kinds[shown:]
    if rest:
        lines.append(f"{sum(k.ms_per_call for k in rest):9.1f} ms  {100 * sum(k.share for k in rest):5.1f} %  "
                     f"{sum(k.ops_per_call for k in rest):6.0f} ops  ({len(rest)} other kinds)")
    return "\n".join(["op time per step, by kind of XLA op (summed over threads):", *lines])
