"""Random erasing on the device, with timm's `RandomErasing` semantics (MAE's `--reprob`).

MAE erases after normalisation (`RandomErasing(reprob, mode=remode, max_count=recount)`
at the end of timm's train transform). The input pipeline normalises whole batches, so
the erasing runs here, in the jitted step, on the normalised global batch before mixup,
as timm's fast loader runs it on the GPU. Each image draws independently, from a JAX key
(so a step's erasing depends only on (seed, step)):

* with probability `reprob`, `count` boxes (uniform in [1, recount]);
* per box, up to ten attempts: area U(0.02, 1/3) * H * W / count, aspect exp U(log 0.3,
  log 1/0.3), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the first
  attempt with h < H and w < W is placed uniformly; none fitting: no box;
* the box is filled per `remode`: 'pixel' N(0, 1) per pixel and channel, 'rand' one
  N(0, 1) colour per box, 'const' zeros. Later boxes overwrite earlier ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

EraseMode = Literal["const", "rand", "pixel"]
ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class ErasingConfig:
    """The original's flags by name (defaults are MAE's), and timm's fixed box ranges."""

    reprob: float = 0.25  # --reprob: probability of erasing an image
    remode: EraseMode = "pixel"  # --remode
    recount: int = 1  # --recount: at most this many boxes per image
    area: tuple[float, float] = (0.02, 1 / 3)  # box area as a fraction of the image (before / count)
    aspect: tuple[float, float] = (0.3, 1 / 0.3)

    def __post_init__(self) -> None:
        if self.remode not in _FILLS:
            raise ValueError(f"--remode {self.remode!r} is not one of {sorted(_FILLS)}")
        if self.recount < 1:
            raise ValueError(f"--recount must be at least 1, got {self.recount}")


def _fill_const(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    del key
    return jnp.zeros(shape)


def _fill_rand(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, (shape[0], 1, 1, shape[3]))


def _fill_pixel(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape)


_FILLS: dict[str, Callable[[jax.Array, tuple[int, ...]], jax.Array]] = {
    "const": _fill_const,
    "rand": _fill_rand,
    "pixel": _fill_pixel,
}


def _erasing_box(
    area_u: jax.Array, aspect_u: jax.Array, offset_u: jax.Array, height: int, width: int, count: jax.Array,
    config: ErasingConfig,
) -> jax.Array:  # fmt: skip
    """timm's box search given its uniform draws: int32 [..., 4] (top, left, h, w); h = w = 0 if no attempt fits.

    `area_u`, `aspect_u` [..., 10] (the attempts) and `offset_u` [..., 2] are U[0, 1) draws,
    mapped as Python's `random.uniform` and `random.randint` map theirs; `count` [...] is
    the number of boxes of the image, which share its area.
    """
    (min_area, max_area), log_aspect = config.area, [math.log(a) for a in config.aspect]
    target = (min_area + (max_area - min_area) * area_u) * (height * width) / count[..., None]
    aspect = jnp.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * aspect_u)
    h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (w < width) & (h < height)
    first, found = jnp.argmax(fits, axis=-1)[..., None], jnp.any(fits, axis=-1)
    h = jnp.where(found, jnp.take_along_axis(h, first, axis=-1)[..., 0], 0)
    w = jnp.where(found, jnp.take_along_axis(w, first, axis=-1)[..., 0], 0)
    top = jnp.floor(offset_u[..., 0] * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(offset_u[..., 1] * (width - w + 1)).astype(jnp.int32)
    return jnp.stack([top, left, h, w], axis=-1)


def erasing_boxes(key: jax.Array, config: ErasingConfig, batch: int, height: int, width: int) -> jax.Array:
    """Each image's boxes, int32 [batch, recount, 4] (top, left, h, w); h = w = 0 where none is drawn."""
    k_gate, k_count, k_box = jax.random.split(key, 3)
    count = jax.random.randint(k_count, (batch, 1), 1, config.recount + 1)
    draws = jax.random.uniform(k_box, (batch, config.recount, 2 * ATTEMPTS + 2))
    boxes = _erasing_box(draws[..., :ATTEMPTS], draws[..., ATTEMPTS:-2], draws[..., -2:], height, width, count, config)
    used = (jax.random.uniform(k_gate, (batch, 1)) <= config.reprob) & (jnp.arange(config.recount) < count)
    return jnp.where(used[..., None], boxes, 0)


def random_erasing(key: jax.Array, images: jax.Array, config: ErasingConfig) -> jax.Array:
    """Erase boxes of normalised NHWC `images` (each image its own draws); the other pixels are untouched."""
    batch, height, width, _ = images.shape
    k_boxes, k_fill = jax.random.split(key)
    boxes = erasing_boxes(k_boxes, config, batch, height, width)
    rows = jnp.arange(height)[None, :, None, None]
    cols = jnp.arange(width)[None, None, :, None]
    for index in range(config.recount):
        top, left, h, w = (boxes[:, index, i, None, None, None] for i in range(4))
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        fill = _FILLS[config.remode](jax.random.fold_in(k_fill, index), images.shape)
        images = jnp.where(inside, fill.astype(images.dtype), images)
    return images
