"""Transforms: torchvision parity (crop sampling, eval pipeline), the patch vote, and the
part map staying aligned with the image under the real augmentation."""

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
import torch
import torchvision.transforms as T
from PIL import Image

from semmae_jax.data import part_maps
from semmae_jax.data.demo import BODY_PLANS, render
from semmae_jax.data.part_maps import NO_PART, write_part_map
from semmae_jax.data.pipeline import TrainLoader
from semmae_jax.data.sources import image_folder
from semmae_jax.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    decode_full,
    decode_ratio,
    normalize,
    patch_vote,
    random_resized_crop_window,
)
from semmae_jax.image_size import height_width

MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
# Part id -> a flat colour far from the others; NO_PART is white.
PALETTE = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0), NO_PART: (255, 255, 255)}



def write_large_jpegs(root: str | Path, num_images: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """`root/train/<class>/*.jpg`: demo creatures enlarged to ImageNet-like JPEGs (width, height),
    with fine grain so that they compress like photographs (~100 kB at 500 x 375)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for k in range(num_images):
        class_name = list(BODY_PLANS)[k % len(BODY_PLANS)]
        image = Image.fromarray(render(class_name, rng)[0]).resize(size, Image.Resampling.BICUBIC)
        grain = rng.normal(0, 6, (size[1], size[0], 3))
        pixels = np.clip(np.asarray(image, np.float64) + grain, 0, 255).astype(np.uint8)
        (root / "train" / class_name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "train" / class_name / f"{class_name}_{k:05d}.jpg", quality=90)
    return root

def raw(data: bytes, part: bytes = b"", pil: bool = False) -> dict:
    return {"image": tf.constant(data), "part": tf.constant(part), "pil": tf.constant(pil)}


def encode(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pixels_of(image: np.ndarray) -> np.ndarray:
    """Pixel values of a uint8 (training) or normalised (evaluation) image."""
    if image.dtype == np.uint8:
        return image.astype(np.int64)
    return np.round((image * STD + MEAN) * 255).astype(np.int64)


# ---------------------------------------------------------------------------- vote


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_tf_patch_vote_equals_numpy_reference(patch_size):
    rng = np.random.default_rng(patch_size)
    values = np.array([0, 1, 2, 5, NO_PART], np.uint8)  # few values: many ties
    for _ in range(20):
        label_map = rng.choice(values, size=(16, 16))
        expected = part_maps.patch_vote(label_map, patch_size)
        np.testing.assert_array_equal(patch_vote(tf.constant(label_map), patch_size).numpy(), expected)


def test_patch_vote_ties_go_to_the_smallest_value_and_no_part_votes():
    # Patch 0 holds 3, 1, 1, 3 (a tie); patch 1 three "no part" and one 0.
    label_map = np.array([[3, 1, NO_PART, NO_PART], [1, 3, NO_PART, 0]], np.uint8)
    np.testing.assert_array_equal(patch_vote(tf.constant(label_map), 2).numpy(), [1, -1])


# ------------------------------------------------------------------ crop sampling


@pytest.mark.parametrize("height,width", [(100, 300), (300, 100), (200, 200), (375, 500)])
def test_crop_fallback_matches_torchvision(height, width):
    scale = (2.0, 3.0)  # no attempt can fit: torchvision's center-crop fallback, no randomness left
    expected = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), [3 / 4, 4 / 3])
    window = random_resized_crop_window(tf.constant([1, 2], tf.int64), tf.constant(height), tf.constant(width), scale)
    assert tuple(window.numpy()) == expected


def crop_statistics(windows: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = windows.T.astype(float)
    return {
        "area": h * w / (height * width),
        "log_aspect": np.log(w / h),
        "top": top / (height - h + 1),
        "left": left / (width - w + 1),
    }


def test_crop_windows_fit_and_follow_torchvision_distribution():
    height, width, n = 375, 500, 2000
    windows = tf.data.Dataset.range(n).map(
        lambda k: random_resized_crop_window(
            tf.stack([tf.constant(7, tf.int64), k]), tf.constant(height), tf.constant(width)
        )
    )
    ours = next(iter(windows.batch(n))).numpy()
    torch.manual_seed(0)
    theirs = np.array(
        [T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    )
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    ours, theirs = crop_statistics(ours, height, width), crop_statistics(theirs, height, width)
    assert 0.19 < ours["area"].min() < 0.21 and ours["area"].max() > 0.97  # the scale range, used to its ends
    assert abs(ours["log_aspect"]).max() < np.log(4 / 3) + 0.02  # the ratio range
    for name in ours:  # the same sampling law
        assert scipy.stats.ks_2samp(ours[name], theirs[name]).pvalue > 1e-4, name


def test_flip_mirrors_the_image_and_the_part_labels_together():
    rng = np.random.default_rng(5)
    data = encode(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "PNG")
    part = encode(rng.integers(0, 6, (30, 40), dtype=np.uint8), "PNG")
    seed = tf.constant([8, 9], tf.int64)
    kept, mirrored = (TrainTransform(img_size=16, patch_size=4, hflip=p)(raw(data, part), seed) for p in (0.0, 1.0))
    np.testing.assert_array_equal(mirrored["image"].numpy(), kept["image"].numpy()[:, ::-1])
    grid = (4, 4)
    np.testing.assert_array_equal(
        mirrored["part_labels"].numpy().reshape(grid), kept["part_labels"].numpy().reshape(grid)[:, ::-1]
    )


# ---------------------------------------------------------------- eval transform


@pytest.mark.parametrize(("size", "resized"), [(224, 256), ((160, 224), (182, 256))], ids=["square", "160x224"])
def test_eval_transform_matches_torchvision_on_real_jpegs(tmp_path, size, resized):
    """Square: the short side to 256, then the crop (MAE's). Non-square (H, W): the image to
    (H, W) / crop_pct, then the crop, as timm's `transforms_factory` builds it for a pair."""
    write_large_jpegs(tmp_path, 3, size=(500, 375))
    write_large_jpegs(tmp_path / "tall", 2, size=(333, 500), seed=1)
    write_large_jpegs(tmp_path / "large", 1, size=(1000, 750), seed=2)
    paths = sorted(tmp_path.rglob("*.jpg"))
    reference = T.Compose(
        [
            T.Resize(resized, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    transform = EvalTransform(size)
    assert transform.resize_size == resized
    differences = []
    for path in paths:
        ours = normalize(transform(raw(path.read_bytes()), tf.constant([0, 0], tf.int64))["image"]).numpy()
        with Image.open(path) as image:
            theirs = reference(image.convert("RGB")).permute(1, 2, 0).numpy()
        differences.append(np.abs((ours - theirs) * STD).mean())  # in units of the [0, 1] pixel range
    print(
        f"eval transform vs torchvision: mean abs difference {np.mean(differences):.5f} of the pixel range "
        f"(worst image {max(differences):.5f})"
    )
    assert max(differences) < 0.01  # the bound asked for
    assert np.mean(differences) < 0.002  # what this implementation achieves (~0.0007): catches regressions


# --------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "fmt,pil", [("PNG", False), ("BMP", False), ("GIF", False), ("WEBP", False), ("TIFF", True), ("PPM", True)]
)
def test_formats_decode_like_pil(fmt, pil):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(pixels, fmt, **options)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(decode_full(raw(data, pil=pil)).numpy(), expected)


# -------------------------------------------------------------- augmentation hooks


def test_pixel_augment_hook_acts_on_the_uint8_image():
    data = encode(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8), "PNG")
    seed = tf.constant([3, 4], tf.int64)
    plain = TrainTransform(img_size=16, patch_size=8)(raw(data), seed)["image"]
    inverted = TrainTransform(img_size=16, patch_size=8, pixel_augment=lambda image, _: 255 - image)(raw(data), seed)
    assert plain.dtype == inverted["image"].dtype == tf.uint8
    np.testing.assert_array_equal(inverted["image"].numpy(), 255 - plain.numpy())


# ---------------------------------------------------------- part-map alignment


def random_part_map(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Rectangles of random parts (and of "no part") on a part-0 ground."""
    label_map = np.zeros((height, width), np.uint8)
    for part in rng.choice(list(PALETTE), size=7):
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        label_map[top : top + rng.integers(4, height // 2), left : left + rng.integers(4, width // 2)] = part
    return label_map


def write_palette_dataset(root, rng, count: int, map_factor: int, fmt: str):
    """Images whose colour at each pixel is the palette colour of its part.

    The part map is stored at 1 / map_factor of the image's resolution (the image is
    its nearest-neighbour enlargement), to check that maps of any resolution align.
    """
    palette = np.zeros((256, 3), np.uint8)
    palette[list(PALETTE)] = list(PALETTE.values())
    for k in range(count):
        height, width = (24, 36) if k % 2 else (40, 28)
        small = random_part_map(rng, height, width)
        full = small.repeat(map_factor, 0).repeat(map_factor, 1)
        path = root / "train" / "c" / f"{k}.{fmt.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(palette[full]).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        write_part_map(root / "parts" / "train" / "c" / f"{k}.png", small)


def nearest_part(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Part id of the nearest palette colour per pixel, and its distance."""
    ids = np.array(list(PALETTE))
    colours = np.array(list(PALETTE.values()))
    distance = np.linalg.norm(pixels[..., None, :] - colours, axis=-1)
    return ids[distance.argmin(-1)].astype(np.uint8), distance.min(-1)


def aligned_batches(tmp_path, map_factor: int, fmt: str, interpolation: str, epochs: int = 3,
                    img_size: int | tuple[int, int] = 32):
    write_palette_dataset(tmp_path, np.random.default_rng(map_factor), 8, map_factor, fmt)
    source = image_folder(tmp_path, "train", tmp_path / "parts")
    transform = TrainTransform(img_size=img_size, patch_size=8, scale=(0.1, 1.0), interpolation=interpolation)
    loader = TrainLoader(source, process_batch=4, transform=transform, seed=map_factor, process_index=0, process_count=1)
    for epoch in range(epochs):
        yield from loader.epoch_batches(epoch)


@pytest.mark.parametrize(("map_factor", "img_size"), [(1, 32), (2, 32), (2, (24, 40))], ids=["1", "2", "2-24x40"])
def test_part_labels_follow_the_colours_exactly_under_crops_and_flips(tmp_path, map_factor, img_size):
    """Nearest resampling keeps every pixel a palette colour: the colour vote must equal the label vote
    (on a non-square output too: the map is warped on the image's H x W grid)."""
    checked = 0
    for batch in aligned_batches(tmp_path, map_factor, "PNG", "nearest", img_size=img_size):
        assert batch["image"].shape[1:3] == height_width(img_size)
        for image, labels in zip(batch["image"], batch["part_labels"], strict=True):
            parts, distance = nearest_part(pixels_of(image))
            assert distance.max() < 2  # lossless: every pixel exactly a palette colour
            np.testing.assert_array_equal(part_maps.patch_vote(parts, 8), labels)
            checked += 1
    assert checked == 24


def test_part_labels_follow_the_colours_with_bicubic_jpegs(tmp_path):
    """The default path (fused JPEG crop, bicubic): blur only blurs near boundaries.

    A patch whose colour majority is decisive even counting every blurred pixel for the
    runner-up must carry that label; and nearly all patches must agree outright.
    """
    agree = total = 0
    for batch in aligned_batches(tmp_path, 1, "JPEG", "bicubic"):
        for image, labels in zip(batch["image"], batch["part_labels"], strict=True):
            parts, distance = nearest_part(pixels_of(image))
            clear = (distance < 60).reshape(4, 8, 4, 8).transpose(0, 2, 1, 3).reshape(16, 64)
            patches = parts.reshape(4, 8, 4, 8).transpose(0, 2, 1, 3).reshape(16, 64)
            for patch, sure, label in zip(patches, clear, labels, strict=True):
                counts = np.bincount(patch[sure], minlength=256)
                top, runner_up = np.sort(counts)[::-1][:2]
                winner = counts.argmax()
                if top > runner_up + (~sure).sum():
                    assert label == (-1 if winner == NO_PART else winner)
                agree += label == (-1 if winner == NO_PART else winner)
                total += 1
    assert agree / total > 0.9


# ------------------------------------------------- fast paths against the exact one, on photographs


@pytest.fixture(scope="module")
def photo_jpegs() -> list[bytes]:
    """scikit-learn's two sample photographs (640 x 427), as JPEGs at quality 90."""
    from sklearn.datasets import load_sample_images

    return [encode(photo, "JPEG", quality=90) for photo in load_sample_images().images]


def _window_and_flip(seed: tf.Tensor, transform: TrainTransform, height: int, width: int):
    crop_seed, flip_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    window = random_resized_crop_window(crop_seed, height, width, transform.scale, transform.ratio)
    return window.numpy(), bool(tf.random.stateless_uniform([], flip_seed) < transform.hflip)


def test_train_resize_kernels_against_torchvision_on_photographs(photo_jpegs):
    """Same window and flip as torchvision's RandomResizedCrop would apply: 'pil' gives its pixels
    (up to the windowed JPEG decode), 'torch' stays within its documented 0.05 levels on average."""
    exact, fast = TrainTransform(img_size=224, resize_kernel="pil"), TrainTransform(img_size=224)
    distance = {"pil": [], "torch": []}
    for data in photo_jpegs:
        with Image.open(io.BytesIO(data)) as image:
            photo = image.convert("RGB")
        for k in range(12):
            seed = tf.constant([k, 3], tf.int64)
            (top, left, h, w), flip = _window_and_flip(seed, exact, photo.height, photo.width)
            theirs = T.functional.resized_crop(photo, top, left, h, w, [224, 224], T.InterpolationMode.BICUBIC)
            theirs = np.asarray(theirs.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else theirs, np.int64)
            for name, transform in (("pil", exact), ("torch", fast)):
                ours = transform(raw(data), seed)["image"].numpy().astype(np.int64)
                distance[name].append(np.abs(ours - theirs).mean())
    print({name: (float(np.mean(d)), float(np.max(d))) for name, d in distance.items()})
    assert np.mean(distance["pil"]) < 0.01 and max(distance["pil"]) < 0.05  # measured 0.001 / 0.008
    assert np.mean(distance["torch"]) < 0.05 and max(distance["torch"]) < 0.5  # measured 0.014 / 0.23


def test_reduced_resolution_decode_stays_within_its_tolerance(photo_jpegs):
    """Windows >= 2x the output decoded at 1/2, 1/4: about 2 grey levels of 255 from the exact
    path on average (documented: at most 3 on average, 5 for any image), and used when it may."""
    size = 64  # windows of a 640 x 427 photo at scale >= 0.5 are >= 2 x 64 on both sides
    exact = TrainTransform(img_size=size, patch_size=16, scale=(0.5, 1.0), reduced_decode=False)
    reduced = dataclasses.replace(exact, reduced_decode=True)
    distances, ratios = [], []
    for data in photo_jpegs:
        for k in range(16):
            seed = tf.constant([k, 7], tf.int64)
            window, _ = _window_and_flip(seed, exact, 427, 640)
            ratios.append(int(decode_ratio(tf.constant(window), size)))
            ours = reduced(raw(data), seed)["image"].numpy().astype(np.int64)
            distances.append(np.abs(ours - exact(raw(data), seed)["image"].numpy().astype(np.int64)).mean())
    print(f"reduced decode vs exact: mean {np.mean(distances):.2f}, worst {max(distances):.2f} levels; ratios {ratios}")
    assert min(ratios) >= 1  # every window here qualifies: the fast path is the one measured
    assert np.mean(distances) < 3 and max(distances) < 5
    assert min(distances) > 0  # it did decode differently (the exact path would give 0)
