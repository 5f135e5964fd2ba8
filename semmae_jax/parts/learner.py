"""The stage-1 part learner of SemMAE (Li et al., NeurIPS 2022), in Flax.

The authors never released it; the paper gives its outline, and each step here says
which of it is the paper's and which is our choice (measured in docs/stage1.md):

1. A frozen self-supervised ViT gives a class token and patch tokens (`backbone.py`).
2. "An attention module turns the class token into N part tokens": `PartTokens`, an MLP
   on the class token (LayerNorm, Linear, GELU, Linear to N x D). Its last bias acts as N
   learned queries and the rest adapts them to the image.
3. "Part attention maps = part tokens x patch tokens, blurred": the logits are
   q_k . x_l / sqrt(D), a softmax over parts makes the maps (they sum to 1 at every
   patch), and a Gaussian blur on the patch grid smooths them. The blur pads by repeating
   the edge, so the blurred maps still sum to 1.
4. "A StyleGAN-like decoder (convolutions on the maps, modulated by AdaIN from the class
   token) reconstructs the image": `PartDecoder`. Its input is the blurred maps and the
   maps painted with a per-part appearance vector (a Linear on each part token, as
   Liu et al. CVPR 2021 and GANSeg do); each upsampling block is nearest x2, 3x3 conv,
   AdaIN whose scale and shift come from a Linear on the class token, leaky ReLU.
5. Ours: the maps also reconstruct the backbone's own patch tokens, x_l ~ sum_k
   M_k(l) b_k with a basis b_k = Linear(q_k) per part (SCOPS's semantic consistency with
   per-image bases). Pixels are dominated by the background's colours; tokens are where
   the parts differ (see `losses.token_reconstruction_loss`).
6. Optional background part (ours, as Liu et al.): one more map, the last, which the
   foreground-area prior (`losses.foreground_area`) lets take every patch the N parts do
   not explain; exported as "no part".

The part of a patch is the argmax over the (unblurred) maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semmae_jax.data.part_maps import UNLABELLED
from semmae_jax.image_size import ImageSize
from semmae_jax.models.vit import VisionTransformer
from semmae_jax.parts.backbone import backbone_model

MIN_DECODER_WIDTH = 16  # channels of the last (largest) decoder blocks


class PartOutputs(NamedTuple):
    """What the part model computes for one batch; the losses compare it with the inputs.

    maps, blurred: [B, P, g, g] with P = num_parts (+1: the background, last).
    patches: [B, L, D] the backbone's patch tokens (L = g * g).
    token_recon: [B, L, D] the patch tokens rebuilt from the blurred maps.
    image_recon: [B, R, R, 3] the image rebuilt by the decoder (R = g * 2 ** upsamples).
    recon_tokens: [B, L, D] the backbone's patch tokens of `image_recon`, or None.
    """

    maps: jax.Array
    blurred: jax.Array
    patches: jax.Array
    token_recon: jax.Array
    image_recon: jax.Array
    recon_tokens: jax.Array | None


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian over +-ceil(2 sigma) taps."""
    radius = max(1, math.ceil(2 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of [..., H, W] maps, edges repeated (sigma 0: unchanged).

    Repeating the edge (rather than zero padding) keeps a constant map constant, so maps
    that sum to 1 over parts still do after the blur.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    for axis in (-2, -1):
        size = maps.shape[axis]
        pad = [(0, 0)] * maps.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(maps, pad, mode="edge")
        maps = sum(w * jax.lax.slice_in_dim(padded, i, i + size, axis=axis % maps.ndim) for i, w in enumerate(kernel))
    return maps


class PartTokens(nn.Module):
    """Class token [B, D] -> part tokens [B, P, D]: LayerNorm, Linear, GELU, Linear."""

    num_tokens: int

    @nn.compact
    def __call__(self, cls: jax.Array) -> jax.Array:
        dim = cls.shape[-1]
        h = nn.gelu(nn.Dense(dim, name="fc1")(nn.LayerNorm(epsilon=1e-6, name="norm")(cls)), approximate=False)
        return nn.Dense(self.num_tokens * dim, name="fc2")(h).reshape(cls.shape[0], self.num_tokens, dim)


class AdaIN(nn.Module):
    """Adaptive instance norm (StyleGAN): normalise each channel over space, then scale and shift from the style."""

    @nn.compact
    def __call__(self, x: jax.Array, style: jax.Array) -> jax.Array:
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(x.var(axis=(1, 2), keepdims=True) + 1e-5)
        gamma, beta = jnp.split(nn.Dense(2 * x.shape[-1], name="style")(style)[:, None, None], 2, axis=-1)
        return x * (1.0 + gamma) + beta


class PartDecoder(nn.Module):
    """Part maps + per-part appearance -> image, upsampling x2 per block with AdaIN from the class token.

    The widths halve at every block (down to `MIN_DECODER_WIDTH`), as StyleGAN's do, so
    the largest resolutions stay cheap.
    """

    width: int = 64
    upsamples: int = 2
    channels: int = 3  # the images' bands

    @nn.compact
    def __call__(self, maps: jax.Array, part_tokens: jax.Array, style: jax.Array) -> jax.Array:
        appearance = nn.Dense(self.width, name="appearance")(part_tokens)  # [B, P, C]
        painted = jnp.einsum("bphw,bpc->bhwc", maps, appearance)
        x = nn.Conv(self.width, (3, 3), name="stem")(jnp.concatenate([painted, maps.transpose(0, 2, 3, 1)], axis=-1))
        width = self.width
        for i in range(self.upsamples):
            n, h, w, c = x.shape
            width = max(width // 2, MIN_DECODER_WIDTH)
            x = nn.Conv(width, (3, 3), name=f"conv_{i}")(jax.image.resize(x, (n, 2 * h, 2 * w, c), "nearest"))
            x = nn.leaky_relu(AdaIN(name=f"adain_{i}")(x, style), 0.2)
        return nn.Conv(self.channels, (1, 1), name="to_rgb")(x)


class PartLearner(nn.Module):
    """Class and patch tokens -> part maps, their blur, and the token and image reconstructions."""

    num_parts: int = 6
    background: bool = False
    blur_sigma: float = 0.5
    decoder_width: int = 64
    decoder_upsamples: int = 2

    @property
    def num_maps(self) -> int:
        return self.num_parts + int(self.background)

    @nn.compact
    def __call__(self, cls: jax.Array, patches: jax.Array, grid: tuple[int, int],
                 channels: int = 3) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Returns (maps, blurred, token_recon, image_recon) as in `PartOutputs`; `patches` are the
        backbone's tokens of a `grid` (rows, columns) of patches, in row order; the image has `channels` bands."""
        n, length, dim = patches.shape
        if grid[0] * grid[1] != length:
            raise ValueError(f"{length} patch tokens do not form a {grid[0]}x{grid[1]} grid")
        queries = PartTokens(self.num_maps, name="part_tokens")(cls)
        logits = jnp.einsum("bpd,bld->bpl", queries, patches) / math.sqrt(dim)
        maps = jax.nn.softmax(logits.astype(jnp.float32), axis=1).reshape(n, self.num_maps, *grid)
        blurred = gaussian_blur(maps, self.blur_sigma)
        bases = nn.Dense(dim, name="token_bases")(queries)
        token_recon = jnp.einsum("bpl,bpd->bld", blurred.reshape(n, self.num_maps, length), bases)
        image = PartDecoder(self.decoder_width, self.decoder_upsamples, channels, name="decoder")(blurred, queries, cls)
        return maps, blurred, token_recon, image


class PartModel(nn.Module):
    """The frozen backbone and the part learner, as one model for `create_state` and checkpoints.

    Its params are {'backbone': ..., 'learner': ...}; the backbone is frozen by the
    caller (`frozen_backbone` in the loss, and no optimizer state: the train job marks
    it frozen). With `feature_loss` the reconstruction is also passed through the
    backbone (resized to its input size), for the feature-space term.
    """

    backbone: VisionTransformer
    learner: PartLearner
    feature_loss: bool = False

    @property
    def img_size(self) -> ImageSize:
        return self.backbone.img_size

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.backbone.image_hw

    @property
    def in_chans(self) -> int:
        return self.backbone.in_chans

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def __call__(self, images: jax.Array) -> PartOutputs:
        tokens = self.backbone.tokens(images)
        patches = tokens[:, 1:]
        maps, blurred, token_recon, image_recon = self.learner(tokens[:, 0], patches, self.backbone.grid_hw,
                                                               self.backbone.in_chans)
        recon_tokens = None
        if self.feature_loss:
            size = (images.shape[0], *images.shape[1:3], image_recon.shape[-1])
            recon_tokens = self.backbone.tokens(jax.image.resize(image_recon, size, "bilinear"))[:, 1:]
        return PartOutputs(maps, blurred, patches, token_recon, image_recon, recon_tokens)


def frozen_backbone(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the backbone's behind `stop_gradient`: its gradient is zero, never computed."""
    return {**params, "backbone": jax.lax.stop_gradient(params["backbone"])}


def assign_parts(maps: jax.Array, background: bool, scale: int = 1) -> jax.Array:
    """Part ids [B, g*s, g*s] (int32) of maps [B, P, g, g]: the argmax over parts.

    With `scale` > 1 the soft maps are upsampled bilinearly first, for part maps finer
    than the patch grid. The background part (the last map) becomes `UNLABELLED` (-1).
    """
    n, parts, h, w = maps.shape
    if scale > 1:
        maps = jax.image.resize(maps, (n, parts, h * scale, w * scale), "bilinear")
    ids = jnp.argmax(maps, axis=1).astype(jnp.int32)
    return jnp.where(ids == parts - 1, UNLABELLED, ids) if background else ids


LEARNER_FIELDS = ("num_parts", "background", "blur_sigma", "decoder_width", "decoder_upsamples")


def build_part_model(settings: Mapping[str, Any], backbone_name: str, backbone_overrides: Mapping[str, Any]) -> PartModel:
    """The frozen backbone + learner that a `parts train` config describes (`LEARNER_FIELDS` and
    `feature_weight` of `settings`): the same for the job and for the tools that read its runs."""
    learner = PartLearner(**{name: settings[name] for name in LEARNER_FIELDS})
    return PartModel(backbone_model(backbone_name, backbone_overrides), learner,
                     feature_loss=settings["feature_weight"] > 0)
