"""Masked autoencoder with a ViT backbone (He et al., "Masked Autoencoders Are Scalable
Vision Learners", CVPR 2022), as MAE's `models_mae.py`, in Flax.

The call mirrors PyTorch MAE's forward: `(loss, pred, mask)` from a batch of normalised
images. The mask is decided by `noise` (small = keep) so that SemMAE's semantic
masking (`semmae_jax.masking`) and parity tests can choose it; without `noise` the
model draws MAE's uniform noise from the `mask` rng stream. Intermediates a caller may
want (the latent, `ids_restore`) are sown into the `intermediates` collection.

Both position tables are fixed sin-cos tables. They live in `params` (so that they
travel with checkpoints, and a loaded checkpoint's own table is used) but are wrapped
in `stop_gradient` here and kept out of the optimizer (`FROZEN_PARAMS`).
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
    layer_norm,
    logical,
    make_blocks,
)
from semmae_jax.models.pos_embed import sincos_init

# Parameters that MAE creates with requires_grad=False.
FROZEN_PARAMS = ("pos_embed", "decoder_pos_embed")


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[N, H, W, C] -> [N, L, p*p*C], each patch ordered (row, column, channel) as MAE."""
    n, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(
    patches: jax.Array, patch_size: int, grid: tuple[int, int] | None = None, channels: int = 3
) -> jax.Array:
    """Inverse of `patchify`: [N, L, p*p*C] -> [N, H, W, C] (square grid unless `grid`)."""
    n, length, _ = patches.shape
    p = patch_size
    gh, gw = grid if grid is not None else (round(length**0.5),) * 2
    if gh * gw != length:
        raise ValueError(f"{length} patches do not form a {gh}x{gw} grid")
    x = patches.reshape(n, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, gh * p, gw * p, channels)


def random_masking(x: jax.Array, mask_ratio: float, noise: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MAE's per-sample shuffle: keep the `int(L * (1 - r))` tokens with the smallest noise.

    Returns (kept tokens [N, keep, D], mask [N, L] with 1 = removed, ids_restore [N, L]).
    """
    n, length, _ = x.shape
    if noise.shape != (n, length):
        raise ValueError(f"noise must be [batch, num_patches] = {(n, length)}, got {noise.shape}")
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    mask = jnp.ones((n, length), jnp.float32).at[:, :len_keep].set(0.0)
    mask = jnp.take_along_axis(mask, ids_restore, axis=1)
    return kept, mask, ids_restore


def masked_patch_loss(
    images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int, norm_pix_loss: bool,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Mean squared error per patch, averaged over the removed patches (float32).

    With `norm_pix_loss` each target patch is standardised with the **unbiased**
    variance (torch's `Tensor.var` default, ddof=1), plus 1e-6, as MAE does. With
    `positions` [N, K], `pred` and `mask` are those of the K patches at these grid positions.
    """
    target = patchify(images.astype(jnp.float32), patch_size)
    if positions is not None:
        target = jnp.take_along_axis(target, positions[..., None], axis=1)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1.0e-6)
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MaskedAutoencoderViT(ViTFields):
    """MAE: a ViT encoder on the visible patches, a light decoder, pixel MSE on the masked ones."""

    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = False

    def setup(self) -> None:
        tokens = logical(nn.initializers.normal(0.02), None, None, "embed")
        table = logical(sincos_init(self.grid_hw), None, None, "embed")
        blocks = self.block_options()
        # Encoder.
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, self.dtype)
        self.cls_token = self.param("cls_token", tokens, (1, 1, self.embed_dim))
        self.pos_embed = self.param("pos_embed", table, (1, self.num_patches + 1, self.embed_dim))
        self.blocks = make_blocks(self.depth, self.num_heads, **blocks)
        self.norm = layer_norm(None, self.dtype, self.layer_norm_eps)
        # Decoder.
        self.decoder_embed = dense(self.decoder_embed_dim, (None, "embed"), None, self.dtype)
        self.mask_token = self.param("mask_token", tokens, (1, 1, self.decoder_embed_dim))
        self.decoder_pos_embed = self.param(
            "decoder_pos_embed", table, (1, self.num_patches + 1, self.decoder_embed_dim)
        )
        self.decoder_blocks = make_blocks(self.decoder_depth, self.decoder_num_heads, **blocks)
        self.decoder_norm = layer_norm(None, self.dtype, self.layer_norm_eps)
        self.decoder_pred = dense(self.patch_size**2 * self.in_chans, ("embed", None), None, self.dtype)

    def forward_encoder(
        self, images: jax.Array, mask_ratio: float, noise: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Embed, add positions, keep the patches at `positions` [N, K] (grid indices; all when None),
        drop the masked tokens, prepend cls, run the blocks.

        Returns (latent [N, 1 + keep, D] after the final norm, mask, ids_restore).
        """
        self.check_images(images)
        x = self.patch_embed(images.astype(self.dtype))
        pos_embed = jax.lax.stop_gradient(self.pos_embed).astype(x.dtype)
        x = x + pos_embed[:, 1:]
        if positions is not None:  # the original's ViT-B/8 on its records' tokens: a subset of the grid
            x = jnp.take_along_axis(x, positions[..., None], axis=1)
        if noise is None:
            noise = jax.random.uniform(self.make_rng("mask"), x.shape[:2])
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype) + pos_embed[:, :1], (x.shape[0], 1, x.shape[-1]))
        x = nn.with_logical_constraint(jnp.concatenate([cls, x], axis=1), ACT)
        x = self.norm(apply_blocks(self.blocks, x))
        return x, mask, ids_restore

    def forward_decoder(self, latent: jax.Array, ids_restore: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Project, append mask tokens, unshuffle, add positions (those of `positions` [N, K] when
        given), decode to pixels (no cls)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (n, length + 1 - x.shape[1], x.shape[-1]))
        x_ = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        x_ = jnp.take_along_axis(x_, ids_restore[..., None], axis=1)
        x = jnp.concatenate([x[:, :1], x_], axis=1)
        table = jax.lax.stop_gradient(self.decoder_pos_embed).astype(x.dtype)
        if positions is not None:  # the cls row, then the rows of the kept positions
            cls_row = jnp.broadcast_to(table[:, :1], (n, 1, table.shape[-1]))
            table = jnp.concatenate([cls_row, jnp.take(table[0, 1:], positions, axis=0)], axis=1)
        x = x + table
        x = nn.with_logical_constraint(x, ACT)
        x = self.decoder_norm(apply_blocks(self.decoder_blocks, x))
        return self.decoder_pred(x)[:, 1:].astype(jnp.float32)

    def __call__(
        self, images: jax.Array, mask_ratio: float = 0.75, noise: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (loss, pred [N, L, p*p*C] float32, mask [N, L] with 1 = removed); with `positions`
        [N, K] (grid indices), the model sees those K patches only, and pred and mask are theirs."""
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, noise, positions)
        self.sow("intermediates", "latent", latent)
        self.sow("intermediates", "ids_restore", ids_restore)
        pred = self.forward_decoder(latent, ids_restore, positions)
        loss = masked_patch_loss(images, pred, mask, self.patch_size, self.norm_pix_loss, positions)
        return loss, pred, mask
