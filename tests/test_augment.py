"""RandAugment in TensorFlow against timm's (PIL) original.

The ops run inside `tf.data` map functions, where the pipeline runs them. Each op is
compared with the function timm calls, on the same uint8 image, at fixed magnitudes
and both signs; RandAugment as a whole is replayed in timm with the draws this module
made; the draws themselves are compared in distribution with timm's own.
"""

from __future__ import annotations

import collections
import io
import random
from collections.abc import Callable

import numpy as np
import pytest
import scipy.stats
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import create_transform

# isort: split
import tensorflow as tf  # after torch and timm: triton crashes when loaded after TensorFlow

from semmae_jax.data import augment
from semmae_jax.data.transforms import TrainTransform

SIZE = 48
MAGNITUDES = (0.0, 3.7, 9.0, 9.6, 10.0)
PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _image(seed: int = 0) -> np.ndarray:
    """A smooth-plus-noise RGB image over [~30, ~250]: every op has something to change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    base = np.stack([(3 * x + y) % 256, (4 * y) % 256, (2 * (x - y)) % 256], -1) * 0.6 + 40
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _in_tf_data(fn: Callable[..., tf.Tensor], *columns: np.ndarray) -> list[np.ndarray]:
    """`fn` mapped over the rows of `columns` in a tf.data pipeline, as the input pipeline runs it."""
    dataset = tf.data.Dataset.from_tensor_slices(columns).map(fn)
    return list(dataset.as_numpy_iterator())


def _timm_args(name: str, magnitude: float, negate: bool) -> tuple:
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    if level_fn is None:
        return ()
    saved = timm_aa._randomly_negate
    timm_aa._randomly_negate = (lambda v: -v) if negate else (lambda v: v)
    try:
        return level_fn(magnitude, {"translate_const": 100})
    finally:
        timm_aa._randomly_negate = saved


def _timm_op(image: Image.Image, name: str, magnitude: float, negate: bool, resample: str = "bicubic") -> np.ndarray:
    """timm's op; Posterize to 0 bits, refused by Pillow >= 10's check, is black as in older Pillow."""
    args = _timm_args(name, magnitude, negate)
    if name.startswith("Posterize") and args[0] <= 0:
        return np.zeros_like(np.asarray(image))
    fn = timm_aa.NAME_TO_OP[name]
    return np.asarray(fn(image, *args, fillcolor=augment.IMAGENET_FILL, resample=PIL_FILTERS[resample]))


# ----------------------------------------------------------------------- the ops


@pytest.mark.parametrize(
    ("name", "resample"),
    [(name, "bicubic") for name in sorted(set(augment.RAND_TRANSFORMS + augment.RAND_INCREASING_TRANSFORMS))]
    + [(name, "bilinear") for name in GEOMETRIC],
)
def test_op_equals_timm_pil(name: str, resample: str) -> None:
    image = _image(3)  # its grey mean, 97.97, tells Contrast's int(mean + 0.5) from int(mean)
    cases = [(m, s) for m in MAGNITUDES for s in (False, True)]
    magnitudes = np.array([m for m, _ in cases], np.float64)
    negates = np.array([s for _, s in cases])
    outs = _in_tf_data(
        lambda m, s: augment.augment_op(tf.constant(image), name, m, negate=s, resample=resample), magnitudes, negates
    )
    pil = Image.fromarray(image)
    changed = 0
    for (magnitude, negate), out in zip(cases, outs, strict=True):
        expected = _timm_op(pil, name, magnitude, negate, resample)
        np.testing.assert_array_equal(out, expected, err_msg=f"{name} m={magnitude} negate={negate}")
        changed += not np.array_equal(out, image)
    assert changed  # the op did something at some magnitude


@pytest.mark.parametrize("name", sorted(set(augment.RAND_TRANSFORMS + augment.RAND_INCREASING_TRANSFORMS)))
def test_level_arguments_equal_timms(name: str) -> None:
    level = augment._OPS[name].level
    if level is None:
        assert timm_aa.LEVEL_TO_ARG[name] is None
        return
    magnitudes = np.concatenate([np.linspace(0, 10, 101), np.random.default_rng(0).uniform(0, 10, 50)])
    for negate in (False, True):
        ours = level(tf.constant(magnitudes, tf.float64), tf.constant(negate)).numpy()
        theirs = [_timm_args(name, float(m), negate)[0] for m in magnitudes]
        np.testing.assert_array_equal(ours, theirs)


def test_low_contrast_and_flat_images() -> None:
    """Histogram ops on edge cases: a narrow range, a single value (both identity tables in PIL)."""
    rng = np.random.default_rng(1)
    narrow = rng.integers(100, 104, (SIZE, SIZE, 3)).astype(np.uint8)
    flat = np.full((SIZE, SIZE, 3), 77, np.uint8)
    for image in (narrow, flat):
        for name in ("AutoContrast", "Equalize", "ContrastIncreasing", "SharpnessIncreasing"):
            out = _in_tf_data(lambda m, i=image, n=name: augment.augment_op(tf.constant(i), n, m), np.array([9.0]))[0]
            np.testing.assert_array_equal(out, _timm_op(Image.fromarray(image), name, 9.0, False))


# ------------------------------------------------------------------- RandAugment


def _replay_in_timm(image: np.ndarray, draws: augment.LayerDraws, names: tuple[str, ...]) -> np.ndarray:
    pil = Image.fromarray(image)
    for op, apply, magnitude, negate in zip(draws.op, draws.apply, draws.magnitude, draws.negate, strict=True):
        if apply:
            pil = Image.fromarray(_timm_op(pil, names[op], float(magnitude), bool(negate)))
    return np.asarray(pil)


RECIPE = augment.RandAugmentConfig.parse("rand-m9-mstd0.5-inc1")


@pytest.fixture(scope="module")
def augmented() -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """MAE's RandAugment on one image for 40 seeds and a repeat of the first, run twice (one pipeline)."""
    image = _image(2)
    seeds = np.stack([np.zeros(41, np.int64), np.append(np.arange(40), 0)], 1)
    dataset = tf.data.Dataset.from_tensor_slices(seeds).map(
        lambda s: augment.rand_augment(tf.constant(image), s, RECIPE)
    )
    return image, seeds, list(dataset.as_numpy_iterator()), list(dataset.as_numpy_iterator())


def test_rand_augment_equals_timm_replayed_with_its_draws(augmented: tuple) -> None:
    image, seeds, outs, _ = augmented
    used = collections.Counter()
    for seed, out in zip(seeds, outs, strict=True):
        draws = augment.LayerDraws(*(d.numpy() for d in augment.draw_layers(tf.constant(seed), RECIPE)))
        np.testing.assert_array_equal(out, _replay_in_timm(image, draws, RECIPE.transforms), err_msg=str(seed))
        used.update(np.asarray(RECIPE.transforms)[draws.op[draws.apply]])
    assert len(used) >= 10  # the replay went through most of the table


def test_rand_augment_is_a_function_of_the_seed(augmented: tuple) -> None:
    _, _, outs, again = augmented
    np.testing.assert_array_equal(outs, again)
    np.testing.assert_array_equal(outs[0], outs[40])
    assert len({out.tobytes() for out in outs}) >= 20  # about a quarter of the seeds apply no op


def test_draws_are_distributed_as_timms() -> None:
    """Op choice (uniform, with replacement), the p = 0.5 coin and the N(9, 0.5) magnitude clipped
    to [0, 10]: ours over many seeds against timm's `RandAugment` with recording ops."""
    config, n = RECIPE, 3000
    draws = tf.data.Dataset.range(n).map(lambda i: augment.draw_layers(tf.stack([i, 7]), config)).batch(n)
    ours = next(draws.as_numpy_iterator())
    ours_ops = np.asarray(config.transforms)[ours.op[ours.apply]]
    ours_mags = ours.magnitude[ours.apply]

    timm = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": augment.IMAGENET_FILL})
    recorded = []
    for op in timm.ops:
        op.level_fn = lambda m, hparams: (m,)
        op.aug_fn = lambda img, m, name=op.name, **kwargs: recorded.append((name, m)) or img
    random.seed(0)
    np.random.seed(0)
    for _ in range(n):
        timm(None)
    timm_ops = [name for name, _ in recorded]
    assert abs(len(recorded) - ours.apply.sum()) < 4 * np.sqrt(n)  # both ~ Binomial(2n, 1/2)
    counts = collections.Counter(ours_ops)
    assert scipy.stats.chisquare([counts[name] for name in config.transforms]).pvalue > 1e-3
    assert scipy.stats.chi2_contingency([[counts[k] for k in config.transforms],
                                         [collections.Counter(timm_ops)[k] for k in config.transforms]]).pvalue > 1e-3  # fmt: skip
    assert scipy.stats.ks_2samp(ours_mags, [m for _, m in recorded]).pvalue > 1e-3
    assert ours_mags.min() >= 0 and ours_mags.max() == 10.0 and abs(ours_mags.mean() - 9.0) < 0.05
    assert abs(ours.negate.mean() - 0.5) < 4 * np.sqrt(0.25 / ours.negate.size)


@pytest.mark.parametrize(
    ("aa", "expected"),
    [
        ("rand-m9-mstd0.5-inc1", augment.RandAugmentConfig(9, magnitude_std=0.5, increasing=True)),
        ("rand-m7-n3-p0.7-mmax12", augment.RandAugmentConfig(7, 3, 0.7, magnitude_max=12)),
        ("rand-mstd101", augment.RandAugmentConfig(magnitude_std=float("inf"))),
        ("rand", augment.RandAugmentConfig()),
    ],
)
def test_parse_equals_timms_reading(aa: str, expected: augment.RandAugmentConfig) -> None:
    config = augment.RandAugmentConfig.parse(aa)
    assert config == expected
    timm = timm_aa.rand_augment_transform(aa, {})
    first = timm.ops[0]
    assert (timm.num_layers, first.prob, first.magnitude) == (config.num_layers, config.prob, config.magnitude)
    assert first.magnitude_std == config.magnitude_std and first.magnitude_max == config.magnitude_max
    assert tuple(op.name for op in timm.ops) == config.transforms


@pytest.mark.parametrize(
    ("aa", "reason"),
    [
        ("original-mstd0.5", "only RandAugment"),
        ("augmix-m5", "only RandAugment"),
        ("rand-m9-tweights", "not implemented"),
        ("rand-x3", "unknown"),
        ("rand-m", "no value"),
    ],
)
def test_unsupported_aa_strings_are_refused(aa: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"--aa.*{reason}"):
        augment.finetune_augment(aa)


def test_settings_equal_maes_create_transform() -> None:
    """What MAE's `create_transform(..., auto_augment=args.aa, interpolation='bicubic')` gives timm's ops."""
    transform = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    (rand,) = [t for t in transform.transforms if isinstance(t, timm_aa.RandAugment)]
    assert {op.kwargs["fillcolor"] for op in rand.ops} == {augment.IMAGENET_FILL}
    assert {op.kwargs["resample"] for op in rand.ops} == {Image.Resampling.BICUBIC}
    assert tuple(op.name for op in rand.ops) == RECIPE.transforms


# ---------------------------------------------------------------------- factory


def test_finetune_hook_plugs_into_train_transform() -> None:
    pixel = augment.finetune_augment()
    assert pixel is not None and augment.finetune_augment(None) is None and augment.finetune_augment("none") is None
    buffer = io.BytesIO()
    Image.fromarray(_image(4)).save(buffer, format="JPEG")
    raw = {"image": tf.constant(buffer.getvalue()), "part": tf.constant(b""), "pil": tf.constant(False)}
    seeds = np.stack([np.zeros(16), np.arange(16)], 1).astype(np.int64)
    outs = {}
    for name, hook in [("augmented", pixel), ("plain", None)]:
        transform = TrainTransform(img_size=32, patch_size=16, scale=(0.08, 1.0), pixel_augment=hook)
        outs[name] = _in_tf_data(lambda s, t=transform: t(raw, s)["image"], seeds)
    assert all(out.shape == (32, 32, 3) and out.dtype == np.uint8 for out in outs["augmented"])
    assert sum(not np.array_equal(a, b) for a, b in zip(outs["augmented"], outs["plain"], strict=True)) >= 8
