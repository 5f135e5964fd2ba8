"""The attention option: 'xla' gives float64 attention's numbers whether or not the weights are
asked for, the weights come out where asked for, 'cudnn' is refused with the reason where it
cannot run, and its training steps lower for an H200 whatever the token count."""

import re
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.cudnn_on_cpu import H200, cudnn_as_on
from semmae_jax.models import create_model
from semmae_jax.models.layers import Attention, check_attention, fused_attention

A100 = SimpleNamespace(platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100")


def numpy_attention(params: dict, x: np.ndarray, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Multi-head attention written out in float64 numpy from the module's own params: (out, weights)."""
    qkv = np.einsum("bnd,dthk->bnthk", x, params["qkv"]["kernel"]) + params["qkv"]["bias"]
    q, k, v = (np.asarray(qkv[:, :, i], np.float64) for i in range(3))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v)
    return np.einsum("bnhk,hkd->bnd", out, params["proj"]["kernel"]) + params["proj"]["bias"], weights


def test_xla_attention_equals_float64_attention():
    x = jax.random.normal(jax.random.key(0), (2, 17, 32))
    module = Attention(num_heads=4)
    params = nn.unbox(module.init(jax.random.key(1), x)["params"])
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)  # non-zero biases
    plain = module.apply({"params": params}, x)
    sowing, state = module.apply({"params": params}, x, mutable=["intermediates"])
    expected, weights = numpy_attention(jax.tree.map(np.asarray, params), np.asarray(x, np.float64), 4)
    np.testing.assert_allclose(plain, expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(sowing, expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(state["intermediates"]["attention"][0], weights, rtol=0, atol=1e-6)


def test_models_sow_weights_only_when_asked_and_agree_either_way():
    model = create_model("vit_test_patch4", dtype="float32")
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = model.init(jax.random.key(1), images)["params"]
    logits = model.apply({"params": params}, images)
    logits_explicit, state = model.apply({"params": params}, images, mutable=["intermediates"])
    np.testing.assert_allclose(logits, logits_explicit, rtol=0, atol=1e-5)
    weights = state["intermediates"]["blocks_1"]["attn"]["attention"][0]
    assert weights.shape == (2, 4, 65, 65)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=0, atol=1e-5)


def test_unknown_attention_is_refused_at_creation():
    with pytest.raises(ValueError, match="unknown attention 'flash'; choose from"):
        create_model("mae_vit_test_patch4", attention="flash")


def test_cudnn_on_this_cpu_is_refused_when_traced():
    model = create_model("mae_vit_test_patch4", attention="cudnn", dtype="bfloat16")
    images = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"attention='cudnn' needs an NVIDIA GPU; JAX runs on 'cpu'"):
        model.init({"params": jax.random.key(0), "mask": jax.random.key(0)}, images)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "device", "message"),
    [
        (jnp.float32, 64, H200, "runs in bfloat16 or float16, the model's dtype is float32"),
        (jnp.bfloat16, 12, H200, "multiple of 8 and at most 256 on this GPU .* this model's is 12"),
        (jnp.bfloat16, 160, A100, "multiple of 8 and at most 128 on this GPU .* this model's is 160"),
        (jnp.bfloat16, 64, SimpleNamespace(platform="gpu", device_kind="AMD MI300X"), "needs an NVIDIA GPU"),
    ],
)
def test_cudnn_refusals_name_the_reason(dtype, head_dim, device, message):
    with pytest.raises(ValueError, match=message):
        check_attention("cudnn", dtype, head_dim, device)


def test_cudnn_conditions_accept_what_cudnn_takes():
    for head_dim in (64, 80, 32, 8):  # ViT-B/L, ViT-H, the decoders, the test models
        check_attention("cudnn", jnp.bfloat16, head_dim, H200)
    check_attention("cudnn", jnp.float16, 256, H200)
    check_attention("xla", jnp.float32, 12)


@pytest.mark.parametrize("length", [17, 18])
def test_fused_attention_pads_odd_lengths_without_changing_values_or_gradients(length):
    """cuDNN refuses odd lengths in training, so `fused_attention` pads one masked token; run here
    with the same function's 'xla' implementation, the padded call must be the plain attention."""
    q, k, v = (jax.random.normal(key, (2, length, 4, 8)) for key in jax.random.split(jax.random.key(0), 3))
    cotangent = jax.random.normal(jax.random.key(1), q.shape)

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    def padded(q, k, v):
        return fused_attention(q, k, v, implementation="xla")

    out, pullback = jax.vjp(padded, q, k, v)
    expected, expected_pullback = jax.vjp(plain, q, k, v)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    for grad, expected_grad in zip(pullback(cotangent), expected_pullback(cotangent), strict=True):
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-5)
    if length % 2:  # the padded call is the one that reaches cuDNN: even length, padding mask
        jaxpr = str(jax.make_jaxpr(padded)(q, k, v))
        assert f"{length + 1},4,8]" in jaxpr


@pytest.mark.parametrize("name", ["mae_vit_test_patch4", "vit_test_patch4"])
def test_cudnn_training_steps_lower_for_an_h200_with_odd_token_counts(name):
    """The training gradient of each model with attention='cudnn', lowered for CUDA on this CPU
    with JAX's cuDNN checks answered as on an H200 (cuDNN 9.14, compute capability 9.0). Their
    token counts are odd (65, and 17 kept by the mask), as every ViT's: without the padding in
    `fused_attention`, JAX refuses them ("Unsupported sequence length Q 197, KV 197" on the H200)."""
    images = jnp.zeros((2, 32, 32, 3))
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1), "dropout": jax.random.key(2)}
    params = create_model(name, dtype="bfloat16").init(rngs, images)["params"]
    model = create_model(name, attention="cudnn", dtype="bfloat16")

    def loss(params):
        if name.startswith("mae_"):
            return model.apply({"params": params}, images, rngs=rngs)[0]
        return model.apply({"params": params}, images, train=True, rngs=rngs).astype(jnp.float32).sum()

    with cudnn_as_on(H200):
        lowered = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
    assert set(re.findall(r"custom_call @(\S+?)\(", lowered)) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}
