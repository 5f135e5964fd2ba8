"""`bench/op_times.py`: a profiler trace summed per kind of XLA op, host spans left out."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from bench import op_times


def _trace(path, events):
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    return path


def test_op_kinds_sum_per_kind_per_call_and_leave_host_spans_out(tmp_path):
    events = [
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},  # host span holding the ops
        {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 9000},
        {"ph": "X", "name": "ynn_fusion.535", "dur": 3000},
        {"ph": "X", "name": "ynn_fusion.12", "dur": 1000},
        {"ph": "X", "name": "copy_bitcast_fusion.3", "dur": 1000},
        {"ph": "X", "name": "wrapped_is-finite", "dur": 1000},
        {"ph": "i", "name": "ynn_fusion.1", "dur": 5000},  # not a span
    ]
    kinds = op_times.op_kinds(_trace(tmp_path / "t.json.gz", events), calls=2)
    assert [(k.kind, k.ms_per_call, k.ops_per_call, k.share) for k in kinds] == [
        ("ynn_fusion", 2.0, 1.0, pytest.approx(4 / 6)), ("copy_bitcast_fusion", 0.5, 0.5, pytest.approx(1 / 6)),
        ("wrapped_is-finite", 0.5, 0.5, pytest.approx(1 / 6))]
    assert "(1 other kinds)" in op_times.table(kinds, shown=2)


def _span(name, start_ms, ms):
    return {"ph": "X", "name": name, "ts": start_ms * 1000, "dur": ms * 1000}


def test_wall_split_says_what_ran_when(tmp_path):
    """0-4 ms a matmul alone, 4-6 beside a copy, 6-7 the copy alone, 7-9 nothing, 9-10 an add
    alone, 10-12 the add beside a select, 12-13 the select alone: per call (2), halved."""
    events = [
        _span("ThunkExecutor::Execute", 0, 10),
        _span("ynn_fusion.1", 0, 6),
        _span("copy_bitcast_fusion.3", 4, 3),
        _span("add_fusion.2", 9, 3),
        _span("select_fusion.7", 10, 3),
    ]
    split = op_times.wall_split(_trace(tmp_path / "t.json.gz", events), calls=2)
    assert split == {"matmuls only": 2.0, "matmuls beside other ops": 1.0, "one other op only": 1.5,
                     "other ops side by side": 1.0, "no op": 1.0}


def test_alone_by_kind_counts_only_an_op_with_nothing_beside_it(tmp_path):
    """A copy alone 0-2 ms and 8-9, an add alone 3-4; the copy beside a matmul 4-5, two adds side by
    side 5-7 and a matmul alone 9-10 are not counted: per call (2), halved, most first."""
    events = [
        _span("copy_bitcast_fusion.1", 0, 2),
        _span("add_fusion.2", 3, 1),
        _span("ynn_fusion.3", 4, 1),
        _span("copy_bitcast_fusion.4", 4, 1),
        _span("add_fusion.5", 5, 2),
        _span("add_fusion.6", 5, 2),
        _span("copy_bitcast_fusion.7", 8, 1),
        _span("ynn_fusion.8", 9, 1),
    ]
    alone = op_times.alone_by_kind(_trace(tmp_path / "t.json.gz", events), calls=2)
    assert alone == [("copy_bitcast_fusion", 1.5), ("add_fusion", 0.5)]


def test_a_real_trace_names_the_steps_ops(tmp_path):
    step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((64, 64))
    step(x).block_until_ready()
    traced = op_times.trace_calls(lambda: step(x), 2, tmp_path / "trace")
    kinds = op_times.op_kinds(traced, 2)
    assert kinds and sum(k.share for k in kinds) == pytest.approx(1.0)
    assert all(k.kind[0].islower() and not k.kind[-1].isdigit() for k in kinds)
    split = op_times.wall_split(traced, 2)
    assert split["matmuls only"] + split["matmuls beside other ops"] > 0
