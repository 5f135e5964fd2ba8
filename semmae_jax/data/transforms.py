"""Image transforms in TensorFlow graph ops, copying torchvision's (MAE's) numerics.

Every transform takes one *raw* example, `{'image': encoded bytes, 'part': encoded
part-map PNG or b'' for none, 'pil': whether the format needs PIL}`, and a stateless
seed of shape [2], and returns a dict of tensors with the image still uint8 (training
batches reach the device as uint8 and are normalised there; evaluation's are
normalised on the host, whole batches at once: `normalize`).
With the seed coming from (seed, epoch, example id), an example's augmentation does
not depend on which thread or process handles it: that is what makes the pipeline
deterministic and resumable.

* `TrainTransform`: MAE's pretraining augmentation, RandomResizedCrop (torchvision's
  parameter sampling) + horizontal flip. A JPEG is decoded only inside its crop window
  (`decode_and_crop_jpeg`), at reduced resolution when the window is >= 2x the output
  (`decode_ratio`); resize + flip run in torch's uint8 antialiased kernel where torch is
  installed, in PIL's (torchvision's own pixels) where it is not (`fastest_resize_kernel`).
  The part map goes through the same geometry (window scaled
  to the map's own resolution, nearest sampling, same flip) and is reduced to one
  label per patch by majority vote, equal to `part_maps.patch_vote`. One optional hook,
  `pixel_augment` on uint8 pixels, is RandAugment's place for fine-tuning; tensor-level
  augmentations (random erasing, mixup / cutmix) belong on the device, in the step, as
  timm's fast loader does them on the GPU.
* `EvalTransform`: resize the short side to `int(img_size / crop_pct)` with
  torchvision's size rule, PIL's bicubic resize (torchvision's exact pixels), center crop.

Cheap alternatives are selected with `tf.where` rather than branched
with `tf.cond`: each cond costs a function call per image.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable
from types import ModuleType
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image

from semmae_jax.data.bands import Bands, read_pixels
from semmae_jax.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from semmae_jax.data.part_maps import NO_PART, UNLABELLED
from semmae_jax.data.tf_runtime import tf
from semmae_jax.image_size import ImageSize, height_width, image_size, size_text

Interpolation = Literal["bicubic", "bilinear", "nearest"]
# An augmentation stage: (image, stateless seed [2]) -> image of the same shape.
Augment = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# (height, width) of the decoded image -> crop window [top, left, height, width].
WindowFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


# ----------------------------------------------------------------------------- decoding


def _pil_decode(data: np.ndarray) -> np.ndarray:
    with Image.open(io.BytesIO(data.tobytes())) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_full(raw: dict[str, tf.Tensor]) -> tf.Tensor:
    """The whole image as uint8 [H, W, 3].

    JPEGs use the accurate integer DCT, which is what PIL (libjpeg's default) uses;
    formats TensorFlow cannot read (TIFF, PPM/PGM) go through PIL.
    """
    data = raw["image"]

    def with_tf() -> tf.Tensor:
        return tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
        )

    def with_pil() -> tf.Tensor:
        # The bytes travel as uint8: a numpy bytes scalar would drop trailing NUL bytes.
        pixels = tf.numpy_function(_pil_decode, [tf.io.decode_raw(data, tf.uint8)], tf.uint8, stateful=False)
        return tf.ensure_shape(pixels, [None, None, 3])

    return tf.cond(raw["pil"], with_pil, with_tf)


class Window(NamedTuple):
    """A decoded crop window: its pixels, and where it lies in the image."""

    pixels: tf.Tensor  # uint8 [h', w', 3]: the window, possibly decoded at 1/ratio of full size
    window: tf.Tensor  # int32 [top, left, h, w]: the window in the full-size image
    size: tf.Tensor  # int32 [H, W]: the full image's size


DECODE_RATIOS = (1, 2, 4, 8)  # libjpeg's DCT scalings that TensorFlow offers


def decode_ratio(window: tf.Tensor, out_size: ImageSize) -> tf.Tensor:
    """Index into `DECODE_RATIOS` of the largest ratio r with the window >= 2 r x `out_size` on both sides.

    Decoded at 1/r the window still has at least twice the output's pixels per side
    (and r = 1 when it has less), so the resize keeps downscaling: its antialiasing
    filter, not the DCT, shapes the result.
    """
    out_h, out_w = height_width(out_size)
    return tf.add_n([tf.cast((window[2] >= 2 * r * out_h) & (window[3] >= 2 * r * out_w), tf.int32)
                     for r in DECODE_RATIOS[1:]])


def _jpeg_window(data: tf.Tensor, size: tf.Tensor, window: tf.Tensor, ratio: int) -> tf.Tensor:
    """`window` decoded at 1/`ratio`: the scaled image's window with rounded corners (ratio 1: exact)."""
    scaled_size = (size + ratio - 1) // ratio  # libjpeg's scaled image size (rounded up)
    start = tf.minimum((window[:2] + ratio // 2) // ratio, scaled_size - 1)
    stop = tf.minimum((window[:2] + window[2:] + ratio // 2) // ratio, scaled_size)
    scaled = tf.concat([start, tf.maximum(stop - start, 1)], 0)
    return tf.io.decode_and_crop_jpeg(data, scaled, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")


def decode_window(raw: dict[str, tf.Tensor], window_fn: WindowFn, out_size: ImageSize | None = None) -> Window:
    """Decode only the window `window_fn(height, width)` of the image.

    A JPEG's size is read from its header and only the window is decoded; with
    `out_size`, at a reduced resolution (`decode_ratio`) when the window is at least
    twice `out_size` on both sides (the common case, ratio 1, costs one branch). Other
    formats are decoded whole and sliced.
    """
    data = raw["image"]

    def jpeg() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        size = tf.io.extract_jpeg_shape(data)[:2]
        window = window_fn(size[0], size[1])
        if out_size is None:
            return _jpeg_window(data, size, window, 1), window, size
        index = decode_ratio(window, out_size)
        reduced = [lambda r=r: _jpeg_window(data, size, window, r) for r in DECODE_RATIOS[1:]]
        pixels = tf.cond(
            index == 0, lambda: _jpeg_window(data, size, window, 1), lambda: tf.switch_case(index - 1, reduced)
        )
        return pixels, window, size

    def whole() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image = decode_full(raw)
        size = tf.shape(image)[:2]
        window = window_fn(size[0], size[1])
        return tf.slice(image, tf.concat([window[:2], [0]], 0), tf.concat([window[2:], [3]], 0)), window, size

    return Window(*tf.cond(tf.logical_and(tf.io.is_jpeg(data), tf.logical_not(raw["pil"])), jpeg, whole))


# ---------------------------------------------------------- bands (not 8-bit RGB)


def decode_bands(raw: dict[str, tf.Tensor], count: int) -> tf.Tensor:
    """Graph op: the image as float32 [H, W, count], the stored values unchanged."""

    def read(data: np.ndarray) -> np.ndarray:
        # The bytes travel as uint8: a numpy bytes scalar would drop trailing NUL bytes.
        pixels = read_pixels(data.tobytes())
        if pixels.shape[-1] != count:
            raise ValueError(f"an image of {pixels.shape[-1]} band(s), the model takes {count}")
        return pixels.astype(np.float32)

    pixels = tf.numpy_function(read, [tf.io.decode_raw(raw["image"], tf.uint8)], tf.float32, stateful=False)
    return tf.ensure_shape(pixels, [None, None, count])


def resize_bands(image: tf.Tensor, size: tuple[int, int] | tf.Tensor) -> tf.Tensor:
    """float32 [h, w, C] -> [*size, C], bicubic, antialiased when shrinking (TensorFlow's kernel)."""
    return tf.image.resize(image, size, method="bicubic", antialias=True)


def normalize_bands(image: tf.Tensor, bands: Bands) -> tf.Tensor:
    """(x - mean) / std per band, float32."""
    return (image - np.asarray(bands.mean, np.float32)) / np.asarray(bands.std, np.float32)


# ------------------------------------------------------------------------- geometry


def random_resized_crop_window(
    seed: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """torchvision's `RandomResizedCrop.get_params` as int32 [top, left, height, width].

    Ten (area, log-ratio) attempts are drawn at once and the first that fits is taken;
    if none fits, the center crop with the aspect ratio clamped to `ratio`, exactly as
    torchvision's fallback. Sizes are rounded half to even, as Python's `round`.
    """
    area_seed, ratio_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    h_in, w_in = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    target_area = h_in * w_in * tf.random.stateless_uniform([10], area_seed, scale[0], scale[1])
    log_ratio = np.log(np.asarray(ratio, np.float32))
    aspect = tf.exp(tf.random.stateless_uniform([10], ratio_seed, log_ratio[0], log_ratio[1]))
    w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.reduce_min(tf.where(fits, tf.range(10), 9))  # any index when none fits: unused then
    u = tf.random.stateless_uniform([2], offset_seed)
    top = tf.minimum(tf.cast(u[0] * tf.cast(height - h[first] + 1, tf.float32), tf.int32), height - h[first])
    left = tf.minimum(tf.cast(u[1] * tf.cast(width - w[first] + 1, tf.float32), tf.int32), width - w[first])
    sampled = tf.stack([top, left, h[first], w[first]])
    # Fallback: the center crop with the aspect ratio clamped (selected, not branched: both are cheap).
    in_ratio = w_in / h_in
    crop_w = tf.where(in_ratio > max(ratio), tf.cast(tf.round(h_in * max(ratio)), tf.int32), width)
    crop_h = tf.where(in_ratio < min(ratio), tf.cast(tf.round(w_in / min(ratio)), tf.int32), height)
    fallback = tf.stack([(height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w])
    return tf.where(tf.reduce_any(fits), sampled, fallback)


ResizeKernel = Literal["pil", "torch"]
_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}


def _pil_resize(pixels: np.ndarray, size: np.ndarray, flip: np.ndarray, method: Interpolation) -> np.ndarray:
    image = Image.fromarray(pixels).resize((int(size[1]), int(size[0])), _PIL_FILTERS[method])
    return np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)


@functools.cache
def _torch() -> ModuleType | None:
    """torch, imported on first use, its ops single-threaded (tf.data runs images in parallel
    already); None where it is not installed: the core install trains without it."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch


def fastest_resize_kernel() -> ResizeKernel:
    """'torch' where torch is installed (the `torch` extra), else 'pil': the training resize's default.

    torch's kernel takes half PIL's CPU time (`python bench/input.py --profile`); PIL's
    gives torchvision's own pixels, and torch's
    stays within the tolerance `tests/test_data_transforms.py` holds it to (0.05 grey
    levels on average, measured 0.015), so an install without torch trains on the same
    images up to that distance.
    """
    return "pil" if _torch() is None else "torch"


def _torch_resize(pixels: np.ndarray, size: np.ndarray, flip: np.ndarray, method: Interpolation) -> np.ndarray:
    torch = _torch()
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(
        image, size=(int(size[0]), int(size[1])), mode=_TORCH_MODES[method], antialias=method != "nearest"
    )[0]
    return (resized.flip(2) if flip else resized).permute(1, 2, 0).contiguous().numpy()


_RESIZERS = {"pil": _pil_resize, "torch": _torch_resize}


def resize(
    image: tf.Tensor,
    size: tf.Tensor | tuple[int, int],
    method: Interpolation,
    kernel: ResizeKernel = "pil",
    flip: tf.Tensor | bool = False,
) -> tf.Tensor:
    """uint8 [h, w, 3] -> uint8 [*size, 3], antialiased when shrinking, by PIL or by torch; mirrored if `flip`.

    'pil' is PIL's `Image.resize`, what torchvision resizes PIL images with: its exact
    pixels. 'torch' is torch's uint8 antialiased kernel (`interpolate(antialias=True)`,
    what torchvision v2 uses for uint8 tensors): about 2x faster, within a small,
    measured distance of PIL's (see `tests/test_data_transforms.py`); `TrainTransform`
    takes the faster one that is installed (`fastest_resize_kernel`). Both release the
    GIL, so tf.data's threads run them in parallel; both beat TensorFlow's antialiased
    `tf.image.resize` in speed (`python bench/input.py --profile`). The flip rides along
    in the same call: a TensorFlow gather costs more than the mirrored copy here.
    """
    size = tf.convert_to_tensor(size, tf.int32)
    resized = tf.numpy_function(
        functools.partial(_RESIZERS[kernel], method=method),
        [image, size, tf.convert_to_tensor(flip, tf.bool)],
        tf.uint8,
        stateful=False,
    )
    static = tf.get_static_value(size)
    return tf.ensure_shape(resized, [None, None, 3] if static is None else [int(static[0]), int(static[1]), 3])


def torchvision_resize_size(height: tf.Tensor, width: tf.Tensor, size: int) -> tf.Tensor:
    """`transforms.Resize(size)` (an int): short side -> size, long side -> int(size * long / short)."""
    short = tf.cast(tf.minimum(height, width), tf.float64)
    long = tf.cast(tf.maximum(height, width), tf.float64)
    new_long = tf.cast(size * long / short, tf.int32)  # truncation, as Python's int()
    return tf.where(height <= width, tf.stack([size, new_long]), tf.stack([new_long, size]))


def center_crop(image: tf.Tensor, size: ImageSize) -> tf.Tensor:
    """`transforms.CenterCrop(size)` for an image at least `size` on each side (its rounding)."""
    shape, (height, width) = tf.shape(image), height_width(size)
    top = tf.cast(tf.round(tf.cast(shape[0] - height, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(shape[1] - width, tf.float64) / 2.0), tf.int32)
    return image[top : top + height, left : left + width]


def flip_columns(size: int, flip: tf.Tensor) -> tf.Tensor:
    """Column order of a width-`size` image, mirrored if `flip` (a gather: no branch, no copy of both)."""
    columns = tf.range(size)
    return tf.where(flip, size - 1 - columns, columns)


def normalize(images: tf.Tensor) -> tf.Tensor:
    """uint8 [..., H, W, 3] -> ToTensor + Normalize(ImageNet mean, std), float32.

    Applied to whole batches. The constants are tiled to [H, W, 3] so that they
    broadcast over leading dimensions only: broadcasting over a trailing dimension of
    3 is several times slower.
    """
    shape = images.shape[-3:]
    scale = np.broadcast_to(1 / (255 * np.asarray(IMAGENET_STD)), shape).astype(np.float32)
    offset = np.broadcast_to(-np.asarray(IMAGENET_MEAN) / IMAGENET_STD, shape).astype(np.float32)
    return tf.cast(images, tf.float32) * scale + offset


# ------------------------------------------------------------------------ part maps


def warp_part_map(
    part_map: tf.Tensor, window: tf.Tensor, image_size: tf.Tensor, out_size: ImageSize, flip: tf.Tensor
) -> tf.Tensor:
    """Crop the [h, w] map with the image's window, resize (nearest) to out_size, flip.

    The map may have any resolution: each output pixel samples the map at the point of
    the original image it shows (pixel centers, the convention of the image resize),
    scaled to the map's resolution. With a map at the image's resolution this is the
    nearest-neighbour resize of the cropped map.
    """
    out_h, out_w = height_width(out_size)
    window = tf.cast(window, tf.float64)
    image_size = tf.cast(image_size, tf.float64)
    map_size = tf.shape(part_map, out_type=tf.int32)
    rows = _sample_index(window[0] + _centers(out_h) * window[2], image_size[0], map_size[0])
    cols = _sample_index(window[1] + _centers(out_w) * window[3], image_size[1], map_size[1])
    return tf.gather(tf.gather(part_map, rows, axis=0), tf.gather(cols, flip_columns(out_w, flip)), axis=1)


def _centers(count: int) -> tf.Tensor:
    """Pixel centers of `count` output pixels, as fractions of the window."""
    return (tf.range(count, dtype=tf.float64) + 0.5) / count


# What `warped_part_labels` puts in every label of a map it refuses (the loader raises, naming the map):
NOT_SINGLE_CHANNEL = -2  # an RGB / palette / grey+alpha PNG: a luminance conversion would invent ids
OUT_OF_RANGE = -256  # minus the first bad value: an id >= num_parts that is not NO_PART (255)


def warped_part_labels(
    part_png: tf.Tensor, window: tf.Tensor, image_size: tf.Tensor, out_size: ImageSize, patch_size: int, flip: tf.Tensor,
    num_parts: int | None = None,
) -> tf.Tensor:
    """Per-patch labels int32 [L] of an encoded part map warped as its image was (`warp_part_map`),
    by majority vote; all `UNLABELLED` for b'' (an image without a map).

    The map is checked whole before warping: single channel, ids in 0..num_parts-1 or
    255. A map that fails gets every label set to a code (`NOT_SINGLE_CHANNEL`, or
    `OUT_OF_RANGE - value`), which the loader turns into an error naming the map.
    """
    out_h, out_w = height_width(out_size)
    num_patches = (out_h // patch_size) * (out_w // patch_size)

    def vote() -> tf.Tensor:
        decoded = tf.io.decode_png(part_png, channels=0)
        part_map = decoded[..., 0]
        bad = (part_map >= num_parts) & (part_map != NO_PART) if num_parts else tf.zeros_like(part_map, tf.bool)
        first_bad = tf.cast(tf.reduce_min(tf.where(bad, part_map, NO_PART)), tf.int32)
        warped = warp_part_map(part_map, window, image_size, out_size, flip)
        labels = patch_vote(tf.ensure_shape(warped, [out_h, out_w]), patch_size)
        labels = tf.where(tf.reduce_any(bad), tf.fill([num_patches], OUT_OF_RANGE - first_bad), labels)
        return tf.where(tf.shape(decoded)[-1] != 1, tf.fill([num_patches], NOT_SINGLE_CHANNEL), labels)

    return tf.cond(tf.strings.length(part_png) > 0, vote, lambda: tf.fill([num_patches], UNLABELLED))


def part_map_problem(labels: np.ndarray, num_parts: int | None) -> str | None:
    """What a refused map's label code says (None for a map that was fine)."""
    code = int(labels.min(initial=0))
    if code == NOT_SINGLE_CHANNEL:
        return "is not a single-channel PNG (RGB, palette or with alpha): write part ids as one 8-bit channel"
    if code <= OUT_OF_RANGE:
        return (f"holds the value {OUT_OF_RANGE - code}, not a part id: ids must be 0..{num_parts - 1} "
                f"(--num_parts {num_parts}) or {NO_PART} for no part")
    return None


def _sample_index(image_coords: tf.Tensor, image_len: tf.Tensor, map_len: tf.Tensor) -> tf.Tensor:
    index = tf.cast(tf.floor(image_coords * tf.cast(map_len, tf.float64) / image_len), tf.int32)
    return tf.clip_by_value(index, 0, map_len - 1)


def patch_vote(part_map: tf.Tensor, patch_size: int) -> tf.Tensor:
    """Majority value per patch of a uint8 [H, W] map (static shape) -> int32 [L], -1 for "no part".

    Same contract as `part_maps.patch_vote` (the numpy reference): "no part" votes, ties
    go to the smallest value (made explicit in the score, as `argmax` leaves ties open).
    """
    rows, cols, p = part_map.shape[0] // patch_size, part_map.shape[1] // patch_size, patch_size
    patches = tf.reshape(tf.transpose(tf.reshape(part_map, [rows, p, cols, p]), [0, 2, 1, 3]), [rows * cols, p * p])
    counts = tf.math.bincount(tf.cast(patches, tf.int32), axis=-1, minlength=NO_PART + 1, maxlength=NO_PART + 1)
    score = counts * (NO_PART + 1) + (NO_PART - tf.range(NO_PART + 1))
    winner = tf.ensure_shape(tf.argmax(score, axis=1, output_type=tf.int32), [rows * cols])
    return tf.where(winner == NO_PART, UNLABELLED, winner)


# ----------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop + flip, the part map warped alongside (MAE pretraining).

    Returns {'image': uint8 [H, W, 3], 'part_labels': int32 [L]} (all -1 without a
    map); the pipeline normalises whole batches. A non-square `img_size` (H, W) gets the
    same crop sampling (`ratio` is the crop's aspect, resized to H x W: timm's rule).
    `pixel_augment` (RandAugment's place)
    acts on the image only: geometric operations would misalign the part map, so use
    it (fine-tuning) without part maps.
    """

    img_size: ImageSize = 224
    patch_size: int = 16
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: Interpolation = "bicubic"
    hflip: float = 0.5
    pixel_augment: Augment | None = None
    reduced_decode: bool = True  # JPEG windows >= 2x img_size decoded at 1/2, 1/4, 1/8 (`decode_ratio`)
    resize_kernel: ResizeKernel = dataclasses.field(default_factory=fastest_resize_kernel)  # see `resize`
    num_parts: int | None = None  # part ids must be below this (or NO_PART); None: only NO_PART is special
    bands: Bands | None = None  # not 8-bit RGB: read as stored, resized in float32, normalised per band

    def __post_init__(self) -> None:
        if self.bands is not None and self.pixel_augment is not None:
            raise ValueError("RandAugment's operations are defined on 8-bit RGB pixels: with "
                             f"{self.bands.count}-band images use --aa none")
        if any(side % self.patch_size for side in height_width(self.img_size)):
            raise ValueError(f"img_size {size_text(self.img_size)} is not a multiple of patch_size {self.patch_size}")
        if self.resize_kernel == "torch" and _torch() is None:  # else every image would fail, skipped as unreadable
            raise ValueError("resize_kernel='torch' needs torch, which is not installed: "
                             "pip install 'semmae-jax[torch]', or leave resize_kernel to its default")

    def __call__(self, raw: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
        crop_seed, flip_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        flip = tf.random.stateless_uniform([], flip_seed) < self.hflip
        if self.bands is not None:
            image = decode_bands(raw, self.bands.count)
            size = tf.shape(image)[:2]
            window = random_resized_crop_window(crop_seed, size[0], size[1], self.scale, self.ratio)
            crop = tf.slice(image, tf.concat([window[:2], [0]], 0), tf.concat([window[2:], [-1]], 0))
            resized = resize_bands(crop, height_width(self.img_size))
            image = normalize_bands(tf.where(flip, tf.reverse(resized, [1]), resized), self.bands)
            image = tf.ensure_shape(image, [*height_width(self.img_size), self.bands.count])
            labels = warped_part_labels(raw["part"], window, size, self.img_size, self.patch_size, flip,
                                        self.num_parts)
            return {"image": image, "part_labels": labels}
        decoded = decode_window(
            raw,
            lambda h, w: random_resized_crop_window(crop_seed, h, w, self.scale, self.ratio),
            self.img_size if self.reduced_decode else None,
        )
        image = resize(decoded.pixels, height_width(self.img_size), self.interpolation, self.resize_kernel, flip)
        if self.pixel_augment is not None:
            image = self.pixel_augment(image, augment_seed)
        labels = warped_part_labels(raw["part"], decoded.window, decoded.size, self.img_size, self.patch_size, flip,
                                    self.num_parts)
        return {"image": image, "part_labels": labels}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Resize (short side) + center crop, torchvision's eval pipeline (normalised per batch).

    Returns {'image': uint8 [H, W, 3]}. `crop_pct` 0.875 gives MAE's 256 -> 224. A non-square
    `img_size` (H, W) resizes the image to (H, W) / crop_pct, then crops (timm's rule). With
    `patch_size`, also 'part_labels' int32 [L]: the part map warped as the image was (the
    crop's window in the image's pixels), one label per patch (all -1 without a map).
    """

    img_size: ImageSize = 224
    crop_pct: float = 0.875
    interpolation: Interpolation = "bicubic"
    patch_size: int | None = None
    bands: Bands | None = None  # not 8-bit RGB: read as stored, resized in float32, normalised per band

    @property
    def resize_size(self) -> ImageSize:
        """The short side before the crop (square), or the (height, width) resized to (non-square)."""
        return image_size([int(side / self.crop_pct) for side in height_width(self.img_size)])

    def __call__(self, raw: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
        del seed  # deterministic
        image = decode_full(raw) if self.bands is None else decode_bands(raw, self.bands.count)
        size = tf.shape(image)[:2]
        target = self.resize_size
        resized = (torchvision_resize_size(size[0], size[1], target) if isinstance(target, int)
                   else tf.constant(target, tf.int32))
        crop = height_width(self.img_size)
        if self.bands is None:
            image = tf.ensure_shape(center_crop(resize(image, resized, self.interpolation), crop), [*crop, 3])
        else:
            image = normalize_bands(center_crop(resize_bands(image, resized), crop), self.bands)
            image = tf.ensure_shape(image, [*crop, self.bands.count])
        out = {"image": image}
        if self.patch_size:
            corner = tf.round(tf.cast(resized - crop, tf.float64) / 2.0)  # center_crop's
            scale = tf.cast(size, tf.float64) / tf.cast(resized, tf.float64)  # resized pixel -> image pixels
            window = tf.concat([corner * scale, tf.constant(crop, tf.float64) * scale], axis=0)
            out["part_labels"] = warped_part_labels(raw["part"], window, size, self.img_size, self.patch_size,
                                                    tf.constant(False))
        return out


Transform = TrainTransform | EvalTransform


@dataclasses.dataclass(frozen=True)
class WholeImageTransform:
    """Stage 1's view: the whole image resized to the backbone's input (no crop), optional flip.

    Returns {'image': uint8 [H, W, 3] (the pipeline normalises batches), 'part_labels':
    int32 [L]} (all -1 without a part map), the map warped with the image, so a part
    map's pixels stay on their image's.
    """

    img_size: ImageSize
    patch_size: int
    hflip: float = 0.0
    bands: Bands | None = None  # not 8-bit RGB: read as stored, resized in float32, normalised per band

    def __call__(self, raw: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
        image = decode_full(raw) if self.bands is None else decode_bands(raw, self.bands.count)
        size = tf.shape(image)[:2]
        flip = tf.random.stateless_uniform([], seed) < self.hflip
        height, width = height_width(self.img_size)
        if self.bands is None:
            image = resize(image, (height, width), "bicubic")
        else:
            image = tf.ensure_shape(normalize_bands(resize_bands(image, (height, width)), self.bands),
                                    [height, width, self.bands.count])
        image = tf.gather(image, flip_columns(width, flip), axis=1)
        window = tf.concat([[0, 0], size], axis=0)
        labels = warped_part_labels(raw["part"], window, size, self.img_size, self.patch_size, flip)
        return {"image": image, "part_labels": labels}
