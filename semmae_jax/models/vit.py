"""Vision Transformer classifier for fine-tuning and evaluation, as MAE's `models_vit.py`
(a timm `VisionTransformer` with `global_pool`), in Flax.

`global_pool=True` (MAE's fine-tuning default): mean of the patch tokens -> `fc_norm` ->
head, and the final `norm` does not exist. `global_pool=False`: final `norm` -> cls
token -> head. With `num_classes=0` the model returns the pooled features (linear
probing, frozen backbones); `pooler=True` adds transformers' `ViTModel` pooler to such an
encoder (dense + tanh on the cls token: its `pooler_output`), so that a hub `ViTModel`
runs and converts back whole. The position table is the checkpoint's (sin-cos at
init) and, unlike in pretraining, it is trained.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from semmae_jax.models.fields import ViTFields
from semmae_jax.models.layers import (
    ACT,
    PatchEmbed,
    apply_blocks,
    dense,
    drop_path_schedule,
    layer_norm,
    logical,
    make_blocks,
)
from semmae_jax.models.pos_embed import sincos_init

# MAE's fine-tuning re-initialises the head with torch's trunc_normal_(std=2e-5), whose cut-off
# is at +-2 in absolute value: at this std that is a plain normal (jax's truncated_normal cuts
# at 2 std and shrinks the spread).
HEAD_INIT_STD = 2e-5


class VisionTransformer(ViTFields):
    """ViT with mean-pool (`global_pool=True`) or cls-token classification."""

    num_classes: int = 1000
    global_pool: bool = True
    drop_path_rate: float = 0.0
    pooler: bool = False  # transformers ViTModel's dense + tanh on the cls token (encoders only)

    def setup(self) -> None:
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, self.dtype)
        self.cls_token = self.param(
            "cls_token", logical(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, self.embed_dim)
        )
        self.pos_embed = self.param(
            "pos_embed", logical(sincos_init(self.grid_hw), None, None, "embed"), (1, self.num_patches + 1, self.embed_dim)
        )
        self.blocks = make_blocks(self.depth, self.num_heads, **self.block_options(),
                                  drop_path_rates=drop_path_schedule(self.drop_path_rate, self.depth))
        if self.global_pool:
            self.fc_norm = layer_norm(None, self.dtype, self.layer_norm_eps)
        else:
            self.norm = layer_norm(None, self.dtype, self.layer_norm_eps)
        if self.num_classes:
            head_init = nn.initializers.normal(HEAD_INIT_STD)
            self.head = dense(self.num_classes, ("embed", "classes"), None, self.dtype, kernel_init=head_init)
        if self.pooler:
            if self.num_classes or self.global_pool:
                raise ValueError("pooler=True is transformers ViTModel's: a cls-token encoder (num_classes=0, "
                                 "global_pool=False)")
            self.pooler_dense = dense(self.embed_dim, ("embed", None), "pooler", self.dtype)

    def tokens(self, images: jax.Array, train: bool = False) -> jax.Array:
        """All tokens [N, 1 + L, D] after the blocks (and after `norm` when cls-pooled)."""
        self.check_images(images)
        x = self.patch_embed(images.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(x.dtype)
        x = apply_blocks(self.blocks, nn.with_logical_constraint(x, ACT), deterministic=not train)
        return x if self.global_pool else self.norm(x)

    def features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """The pooled representation the head sees: [N, D]."""
        x = self.tokens(images, train)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(axis=1))
        return jnp.tanh(self.pooler_dense(x[:, 0])) if self.pooler else x[:, 0]

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Logits [N, num_classes] in float32 (pooled features when `num_classes == 0`)."""
        x = self.features(images, train)
        return (self.head(x) if self.num_classes else x).astype(jnp.float32)


class ProbeHead(nn.Module):
    """MAE's linear-probing head: BatchNorm without affine (eps 1e-6), then a Linear.

    The Linear starts from torch's trunc_normal_(std=0.01) (a normal at this std). The
    batch statistics are those of the global batch (one all-reduced BatchNorm), where
    the original's per-GPU BatchNorm1d saw each GPU's share.
    """

    num_classes: int

    @nn.compact
    def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_bias=False, use_scale=False,
                         name="bn")(features.astype(jnp.float32))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="head")(x)
