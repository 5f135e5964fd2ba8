"""bench/step.py's ceiling line: the step's model FLOPs at the faster framework's large-matmul rate
bound any implementation's step, and the line says how close each framework's step comes to it."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import step  # noqa: E402
from semmae_jax import flops  # noqa: E402
from semmae_jax.models import create_model  # noqa: E402


@pytest.mark.parametrize("jax_rate, torch_rate", [(200.0, 100.0), (100.0, 200.0)])
def test_ceiling_is_the_steps_flops_at_the_faster_matmul_rate(monkeypatch, jax_rate, torch_rate):
    monkeypatch.setattr(step, "gemm_rates", lambda shapes, calls, dtype: [("square", jax_rate, torch_rate)])
    gflop = flops.train_flops(create_model("mae_vit_base_patch16")) * 8 / 1e9
    # JAX's step at 150 GFLOP/s, PyTorch's at 100: 75 % and 50 % of the 200 GFLOP/s peak; the
    # step's FLOPs at the peak take half PyTorch's time, so the bound is 2x.
    line = step.ceiling("mae_vit_base_patch16", 8, "float32", jax_s=gflop / 150, torch_s=gflop / 100)
    assert f"matmul 200 GFLOP/s (JAX {jax_rate:.0f}, PyTorch {torch_rate:.0f})" in line
    assert f"take {gflop / 200 * 1e3:.0f} ms" in line
    assert "at most 2.00x PyTorch" in line
    assert "JAX 150 (75%)" in line and "PyTorch 100 GFLOP/s (50%)" in line
