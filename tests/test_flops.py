"""The analytic FLOP count behind every MFU (jobs' logs, bench/gpu.py, bench/input.py) equals the
matrix products of the models' own programs, and MFU is that count over time and peak."""

import math

import jax
import jax.numpy as jnp
import pytest

from semmae_jax import flops
from semmae_jax.models import create_model


def dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general and convolution in a jaxpr, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval.shape
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += 2 * math.prod(out) * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
        elif eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            total += 2 * math.prod(out) * math.prod(kernel) // kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += dot_flops(inner)
    return total


@pytest.mark.parametrize(("name", "overrides", "mask_ratio"), [
    ("mae_vit_test_patch4", {}, 0.75), ("mae_vit_test_patch4", {}, 0.5), ("vit_test_patch4", {}, 0.75),
    ("vit_test_patch4", {"num_classes": 0}, 0.75), ("mae_vit_demo_patch8", {"img_size": 48}, 0.75),
    ("mae_vit_test_patch4", {"img_size": (24, 40)}, 0.75), ("vit_test_patch4", {"img_size": (40, 24)}, 0.75)])
def test_analytic_flops_equal_the_programs_matrix_products(name, overrides, mask_ratio):
    model = create_model(name, **overrides)
    images = jnp.zeros((1, *model.image_hw, 3))
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "mask": jax.random.key(0)}, images))
    if name.startswith("mae_"):
        noise = jnp.zeros((1, model.num_patches))
        jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, mask_ratio, noise))(variables)
    else:
        jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images))(variables)
    assert flops.forward_flops(model, mask_ratio) == dot_flops(jaxpr.jaxpr)
    assert flops.train_flops(model, mask_ratio) == 3 * dot_flops(jaxpr.jaxpr)


def test_peaks_by_device_kind_and_none_for_unknown_devices():
    kinds = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0,
             "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA L4": 121.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
             "TPU v5p": 459.0, "TPU v6 lite": 918.0, "cpu": None, "NVIDIA L40S": None}
    assert {kind: flops.peak_tflops(kind) for kind in kinds} == kinds


def test_mfu_is_model_flops_per_second_over_the_peak_of_every_device():
    # 2e12 FLOPs in 0.5 s on 4 devices of 2 TFLOP/s: 4 TFLOP/s of 8.
    assert flops.mfu(2e12, 0.5, 2.0, 4) == pytest.approx(0.5, rel=1e-12)
