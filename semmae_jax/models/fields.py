"""The fields and checks the ViT classifier and the MAE share, declared once.

Both are a timm / MAE ViT encoder (patch embedding, cls token, position table, blocks) of
one shape and numerics; each model adds its own fields (the classifier's head and pooling,
the MAE's decoder and loss). Defaults are ViT-B/16 at 224 px.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semmae_jax.image_size import ImageSize, height_width
from semmae_jax.models.layers import LN_EPS, Dtype


class ViTFields(nn.Module):
    """The encoder's shape and numerics, shared by `VisionTransformer` and `MaskedAutoencoderViT`."""

    img_size: ImageSize = 224  # `image_size`'s form: an int when square, else (height, width)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    remat: bool | str = False  # layers.REMAT_POLICIES' name; True is 'full', False 'none'
    layer_norm_eps: float = LN_EPS  # MAE's; transformers' hub configs carry 1e-12
    attention: str = "xla"  # layers.Attention's implementation: 'xla' or 'cudnn'
    qkv_bias: bool = True  # False: q, k, v without biases (a transformers config's `qkv_bias: false`)

    @property
    def image_hw(self) -> tuple[int, int]:
        return height_width(self.img_size)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The patch grid (rows, columns)."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid_hw
        return rows * columns

    def block_options(self) -> dict[str, Any]:
        """`make_blocks`' keyword arguments shared by every block stack of the model."""
        return dict(mlp_ratio=self.mlp_ratio, dtype=self.dtype, remat=self.remat, norm_eps=self.layer_norm_eps,
                    attention=self.attention, qkv_bias=self.qkv_bias)

    def check_images(self, images: jax.Array) -> None:
        """One line naming the model and the shapes, instead of a shape error deep inside a layer."""
        expected = (*self.image_hw, self.in_chans)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects images [N, {', '.join(map(str, expected))}] (NHWC), "
                             f"got {tuple(images.shape)}")
