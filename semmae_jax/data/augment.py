"""RandAugment in TensorFlow graph ops, copying timm's (MAE's fine-tuning augmentation).

MAE fine-tunes with timm's `create_transform(..., auto_augment='rand-m9-mstd0.5-inc1',
interpolation='bicubic', ...)`. `rand_augment` is that RandAugment, written for `tf.data`
map functions and seeded statelessly, so that an image's augmentation is a function of
(seed, epoch, example id) alone: `num_layers` ops drawn uniformly with replacement from
timm's list, each applied with probability `prob` at magnitude N(m, mstd) clipped to
[0, 10]. Only the drawn op runs (a `tf.switch_case`).

Every op copies the PIL function timm calls, integer for integer: the look-up tables of
`ImageOps`, the float32 blends and fixed-point RGB -> L of `ImageEnhance`, the float32
3x3 SMOOTH kernel, and `Image.transform`'s affine resampling (its pixel-centre
convention, its a = -1 bicubic and its bilinear filter in float64, truncation to uint8,
the fill colour outside the source). Geometric ops use bicubic, as timm does when
`create_transform` gets `interpolation='bicubic'`; the fill is the ImageNet mean * 255.
Inside `tf.data` the ops equal timm's to the bit. (In a `tf.function`, grappler's
constant folding may reassociate the translation sum and move a few pixels by one.)

`finetune_augment` turns the original's `--aa` flag into `TrainTransform`'s
`pixel_augment` hook. Random erasing (`--reprob`) acts on the normalised batch, on the
device: `semmae_jax.data.erasing`.

One deliberate difference: timm's Posterize at 0 bits (`PosterizeIncreasing` at
magnitude 10) is refused by recent Pillow (`ValueError`); older Pillow, as MAE ran it,
gives a black image, and so does this port.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import numpy as np

from semmae_jax.data.imagenet import IMAGENET_MEAN
from semmae_jax.data.tf_runtime import tf
from semmae_jax.data.transforms import Augment

Resample = Literal["bilinear", "bicubic", "random"]
LevelFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (magnitude float64, negate bool) -> op argument
PixelFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (uint8 image, argument) -> uint8 image
MatrixFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]  # (argument, width, height) -> affine [6]

LEVEL_DENOM = 10.0  # timm's magnitude scale: level / 10 is the fraction of an op's range


def fill_colour(mean: Sequence[float] = IMAGENET_MEAN) -> tuple[int, ...]:
    """timm's `img_mean` hparam: the fill of the geometric ops, `min(255, round(255 * m))`."""
    return tuple(min(255, round(255 * m)) for m in mean)


IMAGENET_FILL = fill_colour()  # (124, 116, 104)


# ------------------------------------------------------------------ pixel helpers


def _to_uint8(values: tf.Tensor) -> tf.Tensor:
    """PIL's store to 8 bits: clip to [0, 255], then truncate (all values here are >= 0)."""
    return tf.cast(tf.floor(tf.clip_by_value(values, 0.0, 255.0)), tf.uint8)


def _apply_lut(image: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
    """`Image.point` with a per-band table int [3, 256] (or one [256] for all bands), CLIP8'd."""
    flat = tf.reshape(tf.broadcast_to(tf.cast(lut, tf.int32), [3, 256]), [-1])
    mapped = tf.gather(flat, tf.cast(image, tf.int32) + tf.range(3) * 256)
    return tf.cast(tf.clip_by_value(mapped, 0, 255), tf.uint8)


def _histogram(image: tf.Tensor) -> tf.Tensor:
    """`Image.histogram()` as int32 [3, 256]."""
    index = tf.reshape(tf.cast(image, tf.int32) + tf.range(3) * 256, [-1])
    return tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768), [3, 256])


def _last_present(hist: tf.Tensor) -> tf.Tensor:
    """Largest value present in each band's histogram."""
    return 255 - tf.argmax(tf.cast(hist[:, ::-1] > 0, tf.int32), axis=1, output_type=tf.int32)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    """`convert('L')`, ITU-R 601-2 in PIL's fixed point: (19595 R + 38470 G + 7471 B + 2**15) >> 16."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return tf.bitwise.right_shift(weighted, 16)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """`Image.blend(degenerate, image, factor)`: in float32, as PIL's C code, then truncated."""
    alpha = tf.cast(factor, tf.float32)
    base = tf.cast(degenerate, tf.float32)
    return _to_uint8(base + alpha * (tf.cast(image, tf.float32) - base))


# ------------------------------------------------------------- colour operations


def _auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """`ImageOps.autocontrast` (no cutoff): each band's [lo, hi] stretched to [0, 255] by a table."""
    hist = _histogram(image)
    lo = tf.argmax(tf.cast(hist > 0, tf.int32), axis=1, output_type=tf.int32)
    hi = _last_present(hist)
    scale = 255.0 / tf.cast(tf.maximum(hi - lo, 1), tf.float64)
    offset = -tf.cast(lo, tf.float64) * scale
    stretched = tf.cast(tf.range(256, dtype=tf.float64)[None] * scale[:, None] + offset[:, None], tf.int32)
    return _apply_lut(image, tf.where((hi > lo)[:, None], stretched, tf.range(256)[None]))


def _equalize(image: tf.Tensor) -> tf.Tensor:
    """`ImageOps.equalize`: PIL's table `(step // 2 + pixels below) // step`, step from all but the top value."""
    hist = _histogram(image)
    top_count = tf.gather(hist, _last_present(hist), batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - top_count) // 255
    below = tf.math.cumsum(hist, axis=1, exclusive=True)
    lut = (step[:, None] // 2 + below) // tf.maximum(step, 1)[:, None]
    # PIL keeps the image when one value is present, or fewer than 255 pixels lie below the top: step 0
    return _apply_lut(image, tf.where((step == 0)[:, None], tf.range(256)[None], lut))


def _invert(image: tf.Tensor) -> tf.Tensor:
    return 255 - image


def _posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keep the `bits` high bits (8 or more: unchanged; 0: black, as Pillow before its bits >= 1 check)."""
    shift = tf.clip_by_value(8 - tf.cast(bits, tf.int32), 0, 8)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift), shift), tf.uint8)


def _solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """`ImageOps.solarize`: values >= threshold inverted."""
    pixels = tf.cast(image, tf.int32)
    return tf.cast(tf.where(pixels < tf.cast(threshold, tf.int32), pixels, 255 - pixels), tf.uint8)


def _solarize_add(image: tf.Tensor, add: tf.Tensor) -> tf.Tensor:
    """timm's `solarize_add`: `add` added (capped at 255) to values below 128."""
    pixels = tf.cast(image, tf.int32)
    return tf.cast(tf.where(pixels < 128, tf.minimum(255, pixels + tf.cast(add, tf.int32)), pixels), tf.uint8)


def _gray_degenerate(image: tf.Tensor) -> tf.Tensor:
    """`ImageEnhance.Color`'s base: the image converted to L and back."""
    return tf.repeat(_grayscale(image)[..., None], 3, axis=-1)


def _mean_degenerate(image: tf.Tensor) -> tf.Tensor:
    """`ImageEnhance.Contrast`'s base: a flat image at int(mean of L + 0.5)."""
    mean = tf.reduce_mean(tf.cast(_grayscale(image), tf.float64))
    return tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.int32))


def _black_degenerate(image: tf.Tensor) -> tf.Tensor:
    """`ImageEnhance.Brightness`'s base: black."""
    return tf.zeros_like(image)


def _smooth_degenerate(image: tf.Tensor) -> tf.Tensor:
    """`ImageEnhance.Sharpness`'s base: `ImageFilter.SMOOTH`, PIL's float32 3x3 sum, border kept.

    The kernel is (1 1 1 / 1 5 1 / 1 1 1) / 13 divided in float32, and the sum runs in
    PIL's order (row below, centre row, row above, each left to right, after 0.5 for
    rounding), so that the truncated result is PIL's to the bit.
    """
    side, centre = np.float32(1) / np.float32(13), np.float32(5) / np.float32(13)
    pixels = tf.cast(image, tf.float32)

    def row(r: tf.Tensor, middle: np.float32) -> tf.Tensor:
        return r[:, :-2] * side + r[:, 1:-1] * middle + r[:, 2:] * side

    total = 0.5 + row(pixels[2:], side) + row(pixels[1:-1], centre) + row(pixels[:-2], side)
    inner = tf.concat([image[1:-1, :1], _to_uint8(total), image[1:-1, -1:]], axis=1)
    return tf.concat([image[:1], inner, image[-1:]], axis=0)


def _enhance(degenerate: Callable[[tf.Tensor], tf.Tensor]) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """An `ImageEnhance` class: blend from its degenerate image towards the image by `factor`."""
    return lambda image, factor: _blend(degenerate(image), image, factor)


# ---------------------------------------------------------- geometric operations


def _cubic(v1: tf.Tensor, v2: tf.Tensor, v3: tf.Tensor, v4: tf.Tensor, d: tf.Tensor) -> tf.Tensor:
    """PIL's transform BICUBIC (a = -1), term for term in its evaluation order."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _linear(v1: tf.Tensor, v2: tf.Tensor, d: tf.Tensor) -> tf.Tensor:
    return v1 + (v2 - v1) * d


_FILTERS = {"bilinear": (2, _linear), "bicubic": (4, _cubic)}  # name -> (taps, 1-D interpolation)


def _taps(coord: tf.Tensor, size: tf.Tensor, taps: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Source indices [..., taps] around `coord` (pixel-centre based), clamped to the image, and the fraction."""
    base = tf.floor(coord)
    index = tf.cast(base, tf.int32)[..., None] + tf.range(taps) - (taps // 2 - 1)
    return tf.clip_by_value(index, 0, size - 1), coord - base


def _resample(image: tf.Tensor, x: tf.Tensor, y: tf.Tensor, name: str) -> tf.Tensor:
    """Separable interpolation at source points (x, y) in float64: along x on each tap row, then along y."""
    taps, interpolate = _FILTERS[name]
    shape = tf.shape(image)
    cols, dx = _taps(x, shape[1], taps)
    rows, dy = _taps(y, shape[0], taps)
    taps_index = rows[..., :, None] * shape[1] + cols[..., None, :]
    pixels = tf.cast(tf.gather(tf.reshape(image, [-1, 3]), taps_index), tf.float64)  # [H, W, row, col, 3]
    along_x = interpolate(*tf.unstack(pixels, axis=-2), dx[..., None, None])
    return interpolate(*tf.unstack(along_x, axis=-2), dy[..., None])


def _affine(image: tf.Tensor, matrix: tf.Tensor, fill: tf.Tensor, name: str) -> tf.Tensor:
    """`Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)`.

    Output pixel (x, y) reads the source at matrix @ (x + 0.5, y + 0.5, 1); a point
    outside [0, W) x [0, H) takes the fill colour, one inside is interpolated over
    clamped neighbours and truncated to 8 bits.
    """
    a = tf.unstack(tf.cast(matrix, tf.float64))
    shape = tf.shape(image)
    xs = tf.range(tf.cast(shape[1], tf.float64))[None, :] + 0.5
    ys = tf.range(tf.cast(shape[0], tf.float64))[:, None] + 0.5
    x_in = a[0] * xs + a[1] * ys + a[2]
    y_in = a[3] * xs + a[4] * ys + a[5]
    width, height = tf.cast(shape[1], tf.float64), tf.cast(shape[0], tf.float64)
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    values = _to_uint8(_resample(image, x_in - 0.5, y_in - 0.5, name))
    return tf.where(inside[..., None], values, tf.cast(fill, tf.uint8))


def _round15(x: tf.Tensor) -> tf.Tensor:
    return tf.round(x * 1e15) / 1e15


def _rotate_matrix(degrees: tf.Tensor, width: tf.Tensor, height: tf.Tensor) -> tf.Tensor:
    """`Image.rotate(degrees)`'s inverse map about the centre (w / 2, h / 2), cos/sin rounded to 15 places."""
    angle = -(tf.math.floormod(degrees, 360.0) * (math.pi / 180.0))
    cos, sin = _round15(tf.cos(angle)), _round15(tf.sin(angle))
    cx, cy = width / 2.0, height / 2.0
    return tf.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy])


def _matrix(*entries: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor | float]) -> MatrixFn:
    """An affine map whose six entries are functions of (argument, width, height)."""
    return lambda arg, w, h: tf.stack([tf.cast(e(arg, w, h), tf.float64) for e in entries])


def _one(*_: tf.Tensor) -> float:
    return 1.0


def _zero(*_: tf.Tensor) -> float:
    return 0.0


def _arg(arg: tf.Tensor, *_: tf.Tensor) -> tf.Tensor:
    return arg


# ----------------------------------------------------------------- the op table


def _signed(scale: float) -> LevelFn:
    """timm's `level / 10 * scale`, negated with probability 1/2 (`_randomly_negate`)."""
    return lambda m, negate: tf.where(negate, -(m / LEVEL_DENOM * scale), m / LEVEL_DENOM * scale)


def _int_level(scale: float, cap: float = math.inf, reverse_from: float | None = None) -> LevelFn:
    """`min(cap, int(level / 10 * scale))`, or `reverse_from` minus it (the 'Increasing' variants)."""

    def level(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
        del negate
        value = tf.minimum(tf.constant(cap, tf.float64), tf.floor(m / LEVEL_DENOM * scale))
        return value if reverse_from is None else reverse_from - value

    return level


def _enhance_level(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    """Enhancement factor in [0.1, 1.9], growing with the magnitude."""
    del negate
    return m / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_level(m: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
    """Enhancement factor 1 +- 0.9 level / 10, at least 0.1: stronger either way with the magnitude."""
    return tf.maximum(tf.constant(0.1, tf.float64), 1.0 + _signed(0.9)(m, negate))


@dataclasses.dataclass(frozen=True)
class _Op:
    """One timm op: its level -> argument map and either a pixel function or an affine matrix."""

    level: LevelFn | None = None
    pixels: PixelFn | None = None
    matrix: MatrixFn | None = None


def _no_arg(fn: Callable[[tf.Tensor], tf.Tensor]) -> PixelFn:
    return lambda image, arg: fn(image)


_OPS: dict[str, _Op] = {
    "AutoContrast": _Op(pixels=_no_arg(_auto_contrast)),
    "Equalize": _Op(pixels=_no_arg(_equalize)),
    "Invert": _Op(pixels=_no_arg(_invert)),
    "Rotate": _Op(_signed(30.0), matrix=_rotate_matrix),
    "Posterize": _Op(_int_level(4.0), pixels=_posterize),
    "PosterizeIncreasing": _Op(_int_level(4.0, reverse_from=4.0), pixels=_posterize),
    "Solarize": _Op(_int_level(256.0, 256.0), pixels=_solarize),
    "SolarizeIncreasing": _Op(_int_level(256.0, 256.0, reverse_from=256.0), pixels=_solarize),
    "SolarizeAdd": _Op(_int_level(110.0, 128.0), pixels=_solarize_add),
    "Color": _Op(_enhance_level, pixels=_enhance(_gray_degenerate)),
    "ColorIncreasing": _Op(_enhance_increasing_level, pixels=_enhance(_gray_degenerate)),
    "Contrast": _Op(_enhance_level, pixels=_enhance(_mean_degenerate)),
    "ContrastIncreasing": _Op(_enhance_increasing_level, pixels=_enhance(_mean_degenerate)),
    "Brightness": _Op(_enhance_level, pixels=_enhance(_black_degenerate)),
    "BrightnessIncreasing": _Op(_enhance_increasing_level, pixels=_enhance(_black_degenerate)),
    "Sharpness": _Op(_enhance_level, pixels=_enhance(_smooth_degenerate)),
    "SharpnessIncreasing": _Op(_enhance_increasing_level, pixels=_enhance(_smooth_degenerate)),
    "ShearX": _Op(_signed(0.3), matrix=_matrix(_one, _arg, _zero, _zero, _one, _zero)),
    "ShearY": _Op(_signed(0.3), matrix=_matrix(_one, _zero, _zero, _arg, _one, _zero)),
    "TranslateXRel": _Op(_signed(0.45), matrix=_matrix(_one, _zero, lambda a, w, h: a * w, _zero, _one, _zero)),
    "TranslateYRel": _Op(_signed(0.45), matrix=_matrix(_one, _zero, _zero, _zero, _one, lambda a, w, h: a * h)),
}

# timm's `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS` (the `inc1` list), in timm's order.
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip


def _run_op(
    image: tf.Tensor, name: str, magnitude: tf.Tensor, negate: tf.Tensor, fill: tf.Tensor, resample: str
) -> tf.Tensor:
    op = _OPS[name]
    arg = op.level(magnitude, negate) if op.level is not None else None
    if op.matrix is None:
        return op.pixels(image, arg)
    size = tf.cast(tf.shape(image), tf.float64)
    return _affine(image, op.matrix(arg, size[1], size[0]), fill, resample)


def augment_op(
    image: tf.Tensor,
    name: str,
    magnitude: float | tf.Tensor,
    *,
    negate: bool | tf.Tensor = False,
    fill: Sequence[int] = IMAGENET_FILL,
    resample: Literal["bilinear", "bicubic"] = "bicubic",
) -> tf.Tensor:
    """One timm op (`AugmentOp(name)` with prob 1 and no magnitude noise) on uint8 [H, W, 3].

    `negate` stands for timm's coin in `_randomly_negate` (signed ops only).
    """
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {sorted(_OPS)}")
    magnitude = tf.cast(magnitude, tf.float64)
    return _run_op(image, name, magnitude, tf.convert_to_tensor(negate), tf.constant(fill, tf.int32), resample)


# ------------------------------------------------------------------ RandAugment


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
    """timm's `rand_augment_transform` options; defaults are timm's ('rand' alone)."""

    magnitude: float = 10.0  # m
    num_layers: int = 2  # n
    prob: float = 0.5  # p: each chosen op is applied with this probability
    magnitude_std: float = 0.0  # mstd: N(m, mstd) noise; inf (mstd > 100): U(0, m)
    magnitude_max: float | None = None  # mmax: clip bound instead of 10
    increasing: bool = False  # inc: the severity-increasing op list

    @property
    def transforms(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS

    @classmethod
    def parse(cls, config_str: str) -> RandAugmentConfig:
        """Parse timm's `--aa` RandAugment string, e.g. 'rand-m9-mstd0.5-inc1' or 'rand-m7-n3-p0.7'."""
        policy, *sections = config_str.split("-")
        if policy != "rand":
            raise ValueError(f"--aa {config_str!r}: only RandAugment ('rand-...') is implemented, not {policy!r}")
        fields: dict[str, float | int | bool] = {}
        for section in sections:
            key, value = _split_section(config_str, section)
            if key == "mstd":
                fields["magnitude_std"] = math.inf if float(value) > 100 else float(value)
            elif key in _SECTION_FIELDS:
                field, kind = _SECTION_FIELDS[key]
                fields[field] = kind(value)
            else:
                raise ValueError(f"--aa {config_str!r}: unknown RandAugment section {section!r}")
        return cls(**fields)


# section key -> (field, conversion), as timm's parser reads them
_SECTION_FIELDS: dict[str, tuple[str, Callable[[str], float | int | bool]]] = {
    "m": ("magnitude", int),
    "n": ("num_layers", int),
    "p": ("prob", float),
    "mmax": ("magnitude_max", int),
    "inc": ("increasing", lambda v: bool(int(v))),
}


def _split_section(config_str: str, section: str) -> tuple[str, str]:
    if section.startswith("t"):
        raise ValueError(f"--aa {config_str!r}: weighted / named op sets ('t...') are not implemented")
    parts = re.split(r"(\d.*)", section)
    if len(parts) < 2:
        raise ValueError(f"--aa {config_str!r}: section {section!r} has no value")
    return parts[0], parts[1]


class LayerDraws(NamedTuple):
    """The random choices of RandAugment's layers, each [num_layers]."""

    op: tf.Tensor  # int32 index into config.transforms
    apply: tf.Tensor  # bool: the op's probability coin
    magnitude: tf.Tensor  # float64, after noise and clipping
    negate: tf.Tensor  # bool: `_randomly_negate`'s coin
    resample: tf.Tensor  # int32 index into the filters (0 unless 'random')


def draw_layers(seed: tf.Tensor, config: RandAugmentConfig, num_filters: int = 1) -> LayerDraws:
    """All of RandAugment's draws for one image, a function of the stateless `seed` alone."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    n = config.num_layers
    op = tf.random.stateless_uniform([n], seeds[0], 0, len(config.transforms), tf.int32)
    apply = tf.random.stateless_uniform([n], seeds[1], dtype=tf.float64) <= config.prob
    if math.isinf(config.magnitude_std):
        magnitude = tf.random.stateless_uniform([n], seeds[2], 0.0, config.magnitude, tf.float64)
    else:
        noise = tf.random.stateless_normal([n], seeds[2], dtype=tf.float64) * config.magnitude_std
        magnitude = config.magnitude + noise
    magnitude = tf.clip_by_value(magnitude, 0.0, config.magnitude_max or LEVEL_DENOM)
    negate = tf.random.stateless_uniform([n], seeds[3], dtype=tf.float64) > 0.5
    resample = tf.random.stateless_uniform([n], seeds[4], 0, num_filters, tf.int32)
    return LayerDraws(op, apply, magnitude, negate, resample)


def rand_augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    config: RandAugmentConfig,
    *,
    fill: Sequence[int] = IMAGENET_FILL,
    interpolation: Resample = "bicubic",
) -> tf.Tensor:
    """timm's `RandAugment` on uint8 [H, W, 3], deterministic given the stateless `seed` [2].

    `interpolation` is timm's `hparams['interpolation']`: MAE's 'bicubic', or 'random'
    (bilinear or bicubic per op, timm's default when no interpolation is given).
    """
    filters = ("bilinear", "bicubic") if interpolation == "random" else (interpolation,)
    draws = draw_layers(seed, config, len(filters))
    fill_tensor = tf.constant(fill, tf.int32)
    out = image
    for layer in range(config.num_layers):
        out = _apply_layer(out, config.transforms, filters, fill_tensor, *(d[layer] for d in draws))
    return tf.ensure_shape(out, image.shape)


def _apply_layer(
    image: tf.Tensor,
    names: Sequence[str],
    filters: Sequence[str],
    fill: tf.Tensor,
    op: tf.Tensor,
    apply: tf.Tensor,
    magnitude: tf.Tensor,
    negate: tf.Tensor,
    resample: tf.Tensor,
) -> tf.Tensor:
    """The chosen op of one layer if its coin says so: one switch, whose last branch is "no op"; only the taken
    branch runs."""

    def branch(name: str, filter_name: str) -> Callable[[], tf.Tensor]:
        return lambda: _run_op(image, name, magnitude, negate, fill, filter_name)

    branches = [branch(name, f) for name in names for f in filters] + [lambda: image]
    return tf.switch_case(tf.where(apply, op * len(filters) + resample, len(branches) - 1), branches)


# ---------------------------------------------------------------------- factory


def finetune_augment(
    aa: str | None = "rand-m9-mstd0.5-inc1",
    *,
    interpolation: Resample = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
) -> Augment | None:
    """The `pixel_augment` hook of `TrainTransform` for the original's `--aa` flag.

    Args:
        aa: timm's `--aa`: a RandAugment string 'rand-...' (sections m, n, p, mstd, mmax,
            inc), or None / '' / 'none' for no auto-augmentation.
        interpolation: resampling of the geometric ops (MAE's `create_transform` passes
            'bicubic'; 'random' is timm's choice when none is given).
        mean: the normalisation mean, whose * 255 is the fill colour of the geometric ops.

    Returns:
        RandAugment on uint8 pixels, or None. (Random erasing, `--reprob`, acts on the
        normalised batch: `semmae_jax.data.erasing`.)
    """
    if not aa or aa == "none":
        return None
    return functools.partial(
        rand_augment, config=RandAugmentConfig.parse(aa), fill=fill_colour(mean), interpolation=interpolation
    )
