"""Transformer pieces shared by the MAE pretraining model and the ViT classifier.

The modules mirror timm's `vision_transformer.py` as MAE used it, with the numerics that
a naive port gets wrong spelled out where they occur: exact (erf) GELU, LayerNorm eps
1e-6, xavier-uniform Linear init with a zero bias, and a patch embedding initialised
like a Linear on its flattened (C*p*p) input. Module names equal the PyTorch attribute
names (`blocks_3/attn/qkv`, `mlp/fc1`): the checkpoint converter relies on them.

Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`) and every
activation between blocks is pinned to (`act_batch`, `act_len`, `act_emb`); the mesh
rules in `semmae_jax.sharding` decide what those names mean on devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
LN_EPS = 1e-6  # timm's default is 1e-5; MAE builds every LayerNorm with eps=1e-6.
ACT = ("act_batch", "act_len", "act_emb")


def logical(init: Callable, *names: str | None) -> Callable:
    """Attach logical axis names to a parameter initializer."""
    return nn.with_logical_partitioning(init, names)


xavier = nn.initializers.xavier_uniform()


def xavier_over(in_axis: int | tuple[int, ...], out_axis: int | tuple[int, ...]) -> Callable:
    """xavier-uniform with the fans of a multi-axis kernel: the torch Linear it stands for."""
    return nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)
zeros = nn.initializers.zeros
ones = nn.initializers.ones


# A LayerNorm that keeps only its input for the backward pass and recomputes the rest there: its
# float32 statistics and normalised values would be kept otherwise, each as large as the input.
LayerNorm = nn.remat(nn.LayerNorm)


def lean_backward(dtype: Dtype) -> bool:
    """Whether layers keep less for the backward pass (LayerNorm and GELU recomputed there, the 'xla'
    attention weights kept once): in a 16-bit compute dtype, the accelerators' training, where
    activations bound the batch. In float32 (the CPU default, the parity tests) the step keeps what
    differentiating the forward pass as written keeps, at that speed."""
    return jnp.dtype(dtype).itemsize < 4


def layer_norm(name: str | None, dtype: Dtype, eps: float = LN_EPS) -> nn.LayerNorm:
    """LayerNorm(eps=1e-6 unless a checkpoint says otherwise: transformers' hub configs carry
    1e-12); statistics are computed in float32 whatever `dtype` is, and in a 16-bit `dtype`
    recomputed in the backward pass from the input (`LayerNorm`, `lean_backward`)."""
    return (LayerNorm if lean_backward(dtype) else nn.LayerNorm)(
        epsilon=eps,
        dtype=dtype,
        scale_init=logical(ones, "embed"),
        bias_init=logical(zeros, "embed"),
        name=name,
    )


def dense(
    features: int, names: tuple[str | None, str | None], name: str | None, dtype: Dtype, kernel_init=xavier
) -> nn.Dense:
    """A Linear as MAE initialises it: xavier-uniform kernel, zero bias."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=logical(kernel_init, *names),
        bias_init=logical(zeros, names[1]),
        name=name,
    )


def patch_bias_init(fan_in: int):
    """PyTorch Conv2d's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): MAE keeps it."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class PatchEmbed(nn.Module):
    """Stride-p convolution: one Dense applied to every p x p x C patch.

    The kernel is xavier-uniform over the (C*p*p, D) view, as MAE does with
    `xavier_uniform_(w.view([w.shape[0], -1]))`; Flax's own conv fans would differ.
    """

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        fan_in = p * p * images.shape[-1]
        x = nn.Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=logical(xavier_over(in_axis=(0, 1, 2), out_axis=3), None, None, None, "embed"),
            bias_init=logical(patch_bias_init(fan_in), "embed"),
            name="proj",
        )(images)
        n, gh, gw, d = x.shape
        return x.reshape(n, gh * gw, d)


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,
    "minimal": _policies.checkpoint_dots_with_no_batch_dims,
    "save_dot_except_mlp": _policies.save_only_these_names("qkv_proj", "out_proj"),
    "save_qkv_proj": _policies.save_only_these_names("qkv_proj"),
    "full": _policies.nothing_saveable,
}


def remat_policy(remat: bool | str) -> str:
    """The policy's name: a bool means 'full' or 'none' (the jobs' `--remat` flag)."""
    name = ("full" if remat else "none") if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {list(REMAT_POLICIES)} (or a bool)")
    return name
QKV = ("act_batch", "act_len", "act_heads", None)


def check_attention(implementation: str, dtype: Dtype, head_dim: int, device: Any = None) -> None:
    """Refuse, with the reason, an attention implementation that cannot run on `device`
    (default: JAX's first device).

    `jax.nn.dot_product_attention(implementation="cudnn")` fails deep inside cuDNN's
    lowering; these are its conditions (jax's `check_is_flash_attention`: a CUDA GPU,
    bf16/fp16, head dim a multiple of 8 and <= 128, or 256 from compute capability 9.0),
    checked before it is called so that the message names the model option.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation != "cudnn":
        return
    device = jax.devices()[0] if device is None else device
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or capability is None:
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU; JAX runs on {device.platform!r} "
                         f"({device.device_kind}): use attention='xla'")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"attention='cudnn' (flash attention) runs in bfloat16 or float16, the model's dtype is "
                         f"{jnp.dtype(dtype).name}: set dtype='bfloat16' or use attention='xla'")
    max_dim = 256 if tuple(int(v) for v in str(capability).split(".")) >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_dim:
        raise ValueError(f"attention='cudnn' needs a head dim that is a multiple of 8 and at most {max_dim} on "
                         f"this GPU (compute capability {capability}); this model's is {head_dim}: use attention='xla'")


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid_length: int | None = None,
                    implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` on [B, L, heads, head_dim] for any sequence length L.

    JAX's cuDNN path refuses an odd L in a training step ("Unsupported sequence length Q 197,
    KV 197": its check counts the empty bias it passes as a bias, and cuDNN needs even lengths
    with one), and a ViT's L is odd (1 + 196 tokens; MAE's decoders, ViT-B/8's 785). With
    `valid_length`, the caller has padded the tokens (once for a whole block stack,
    `apply_blocks`) and the keys from `valid_length` on are masked (`key_value_seq_lengths`,
    cuDNN's padding mask). Without it, an odd L is padded here by one masked token and the
    padded query's row dropped. Either way values and gradients are the unpadded ones.
    `implementation` is only for checking that on a CPU with 'xla'.
    """
    length = q.shape[1]
    if valid_length is not None:
        lengths = jnp.full((q.shape[0],), valid_length, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
    if length % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    padded = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
    return fused_attention(*padded, valid_length=length, implementation=implementation)[:, :length]


def fuses_attention(module: nn.Module, implementation: str) -> bool:
    """Whether `module`'s attention runs cuDNN's fused kernel: 'cudnn', unless the caller asks for the
    `intermediates` collection (the weights, which a fused kernel has none of)."""
    return implementation == "cudnn" and not module.is_mutable_collection("intermediates")


@jax.custom_vjp
def softmax_in_float32(logits: jax.Array) -> jax.Array:
    """Softmax over the last axis computed in float32 and returned in `logits`' dtype, whose backward
    pass keeps only that returned copy.

    Differentiated as written (`softmax(x.astype(float32)).astype(bfloat16)`), a bfloat16 model
    keeps the [heads, L, L] weights twice: in float32 for the softmax's derivative, and in
    bfloat16 for the weighted sum's (`python bench/memory_account.py --attention xla`). The
    derivative is the softmax's own, y * (g - sum(y * g)), in float32 from the kept weights.
    """
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


def _softmax_forward(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    weights = softmax_in_float32(logits)
    return weights, weights


def _softmax_backward(weights: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
    y, g = weights.astype(jnp.float32), grad.astype(jnp.float32)
    yg = y * g
    return ((yg - y * yg.sum(axis=-1, keepdims=True)).astype(grad.dtype),)


softmax_in_float32.defvjp(_softmax_forward, _softmax_backward)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    The qkv kernel is [D, 3, heads, head_dim] (the torch [3D, D] weight, transposed and
    split) and the output kernel [heads, head_dim, D]: they initialise with the torch
    Linear's xavier bound (qkv fans D and 3D) and let tensor parallelism split whole
    heads. The softmax runs in float32 for any compute dtype.

    `implementation`: 'xla' (any backend) writes softmax(q k^T) v out as einsums over
    [B, heads, L, head_dim], where XLA finds each head's matrices in place (on CPU the
    MAE ViT-B training step ran 6 % faster than with `jax.nn.dot_product_attention`'s
    [B, L, heads, head_dim] einsums, paired in one process); 'cudnn' is that function's
    cuDNN flash attention (NVIDIA GPUs in bfloat16/float16; the [heads, L, L] scores are
    never stored; an odd L is padded by one masked token, `fused_attention`). When the
    caller asks for the `intermediates` collection (stage 1's raw-attention baseline,
    attention pictures), the weights are sown as `attention` whatever the implementation:
    a fused kernel has none to give.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "xla"
    qkv_bias: bool = True  # timm's and transformers' `qkv_bias`: False drops the q, k, v biases

    @nn.compact
    def __call__(self, x: jax.Array, valid_length: int | None = None) -> jax.Array:
        """`valid_length`: the tokens from there on are padding (fused attention only), masked as keys."""
        dim = x.shape[-1]
        head_dim = dim // self.num_heads
        check_attention(self.implementation, self.dtype, head_dim)
        qkv = nn.Einsum(
            (dim, 3, self.num_heads, head_dim),
            "bnd,dthk->bnthk",
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            kernel_init=logical(xavier_over(in_axis=0, out_axis=(1, 2, 3)), "embed", None, "heads", "kv"),
            bias_init=logical(zeros, None, "heads", "kv"),
            name="qkv",
        )(x)
        qkv = checkpoint_name(qkv, "qkv_proj")
        q, k, v = (nn.with_logical_constraint(qkv[:, :, i], QKV) for i in range(3))
        if fuses_attention(self, self.implementation):
            out = fused_attention(q, k, v, valid_length)
        else:
            out = self.explicit_attention(q, k, v)
        out = nn.Einsum(
            (self.num_heads, head_dim, dim),
            "bnhk,hkd->bnd",
            dtype=self.dtype,
            kernel_init=logical(xavier_over(in_axis=(0, 1), out_axis=2), "heads", "kv", "embed"),
            bias_init=logical(zeros, "embed"),
            name="proj",
        )(out)
        return checkpoint_name(out, "out_proj")

    def explicit_attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """softmax(q k^T / sqrt(d)) v with the weights [B, heads, L, L] sown as `attention`."""
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * q.shape[-1] ** -0.5, k)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_heads", None, None))
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "attention", jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
        if lean_backward(self.dtype):
            weights = softmax_in_float32(logits)
        else:
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)


def exact_gelu(x: jax.Array) -> jax.Array:
    """GELU with erf (Flax's default `nn.gelu` is the tanh approximation)."""
    return nn.gelu(x, approximate=False)


def _activate_and_project(mlp: Mlp, h: jax.Array, features: int) -> jax.Array:
    h = nn.with_logical_constraint(exact_gelu(h), ("act_batch", "act_len", "act_mlp"))
    return dense(features, ("mlp", "embed"), "fc2", mlp.dtype)(h)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2.

    In a 16-bit dtype (`lean_backward`) GELU and fc2 are one rematerialised piece: the backward pass
    keeps only fc1's output and recomputes GELU from it, where it needs GELU's derivative anyway.
    Differentiated as written, GELU would also keep its `erfc`, `exp` and product intermediates and
    fc2 its input: four more tensors as large as the hidden layer (`python bench/memory_account.py`).
    """

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = checkpoint_name(dense(self.hidden_dim, ("embed", "mlp"), "fc1", self.dtype)(x), "mlpwi")
        project = nn.remat(_activate_and_project, static_argnums=(2,)) if lean_backward(self.dtype) else _activate_and_project
        return checkpoint_name(project(self, h, x.shape[-1]), "mlpwo")


class DropPath(nn.Module):
    """Stochastic depth per sample, as timm's `drop_path` (rescaled by 1 / keep)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    norm_eps: float = LN_EPS
    attention: str = "xla"
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, valid_length: int | None = None) -> jax.Array:
        """`valid_length`: the tokens from there on are padding for fused attention (`apply_blocks`)."""
        dim = x.shape[-1]
        drop = DropPath(self.drop_path)
        norm1, norm2 = (layer_norm(name, self.dtype, self.norm_eps) for name in ("norm1", "norm2"))
        attn = Attention(self.num_heads, self.dtype, self.attention, self.qkv_bias, name="attn")
        x = x + drop(attn(checkpoint_name(norm1(x), "norm"), valid_length), deterministic)
        mlp = Mlp(int(dim * self.mlp_ratio), self.dtype, name="mlp")
        x = x + drop(mlp(checkpoint_name(norm2(x), "norm")), deterministic)
        return nn.with_logical_constraint(x, ACT)


def make_blocks(
    depth: int,
    num_heads: int,
    *,
    mlp_ratio: float,
    dtype: Dtype,
    remat: bool | str,
    norm_eps: float = LN_EPS,
    attention: str = "xla",
    qkv_bias: bool = True,
    drop_path_rates: Sequence[float] | None = None,
) -> list[Block]:
    """`depth` blocks for a `setup()` list attribute (Flax names them `{attr}_{i}`).

    With `remat`, activations inside each block are recomputed in the backward pass
    (`nn.remat`), trading compute for memory on the big models. `attention` is the
    `Attention` implementation ('xla' or 'cudnn'); `qkv_bias=False` builds the q, k, v
    projections without biases (transformers' `qkv_bias: false`).
    """
    policy = remat_policy(remat)
    block_cls = Block if policy == "none" else nn.remat(Block, static_argnums=(2, 3), policy=REMAT_POLICIES[policy])
    rates = drop_path_rates if drop_path_rates is not None else [0.0] * depth
    return [block_cls(num_heads, mlp_ratio, rates[i], dtype, norm_eps, attention, qkv_bias) for i in range(depth)]


def apply_blocks(blocks: Sequence[Block], x: jax.Array, deterministic: bool = True) -> jax.Array:
    """Run `x` through the transformer blocks in order.

    Fused (cuDNN) attention needs an even token count in training (`fused_attention`): an odd
    one is padded here by one token once for the whole stack, masked as a key in every block and
    dropped at the end, rather than padded and sliced again in every block, where each block
    would keep both its padded q, k, v and its sliced output for the backward pass.
    """
    length = x.shape[1]
    pad = bool(blocks) and length % 2 == 1 and fuses_attention(blocks[0], blocks[0].attention)
    if pad:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    for block in blocks:
        x = block(x, deterministic, length if pad else None)
    return x[:, :length] if pad else x


def drop_path_schedule(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate rising linearly from 0 to `rate` over the blocks (timm's `dpr`)."""
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]
