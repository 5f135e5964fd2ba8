"""Device-side random erasing against timm's `RandomErasing`.

The box search is replayed in timm with the same uniform draws (through a stand-in for
its `random` module); the whole operation is compared in distribution with timm's own.
"""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from timm.data import random_erasing as timm_re

from semmae_jax.data.erasing import ErasingConfig, _erasing_box, random_erasing

MAE = ErasingConfig()  # --reprob 0.25 --remode pixel --recount 1
FLAT = jnp.full((2000, 32, 40, 3), 7.0)  # one shape for the tests of MAE's setting: one compilation
_erase = jax.jit(random_erasing, static_argnums=2)


class _ReplayRandom:
    """Stands in for the `random` module inside timm's RandomErasing: returns given uniforms."""

    def __init__(self, area: np.ndarray, aspect: np.ndarray, offset: np.ndarray) -> None:
        self.uniforms = iter(np.stack([area, aspect], 1).ravel())
        self.offsets = iter(offset)

    def random(self) -> float:
        return 0.0  # the erase-or-not coin: erase

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * float(next(self.uniforms))

    def randint(self, a: int, b: int) -> int:
        return a + int(next(self.offsets) * (b - a + 1))


@pytest.mark.parametrize(("height", "width"), [(48, 48), (20, 64), (64, 20)])
def test_box_equals_timms_given_the_same_draws(monkeypatch: pytest.MonkeyPatch, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    eraser = timm_re.RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    draws = rng.uniform(size=(200, 22)).astype(np.float32)
    boxes = _erasing_box(draws[:, :10], draws[:, 10:20], draws[:, 20:], height, width, jnp.ones(200), MAE)
    for draw, (top, left, h, w) in zip(draws, np.asarray(boxes), strict=True):
        monkeypatch.setattr(timm_re, "random", _ReplayRandom(draw[:10], draw[10:20], draw[20:]))
        image = eraser(torch.full((3, height, width), 1e6))
        expected = np.zeros((height, width), bool)
        expected[top : top + h, left : left + w] = True
        np.testing.assert_array_equal((image[0] != 1e6).numpy(), expected)
    assert (np.asarray(boxes)[:, 2] > 0).mean() > 0.7


def _is_rectangle(mask: np.ndarray) -> bool:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return bool(mask.any()) and mask.sum() == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


def test_statistics_and_untouched_pixels() -> None:
    """MAE's setting on 2000 images: each erased with p 0.25, one rectangle of N(0, 1) noise whose
    area is distributed as timm's, everything else bit-identical."""
    out = np.asarray(_erase(jax.random.key(0), FLAT, MAE))
    erased = (out != 7.0).any(-1)
    hit = erased.any((1, 2))
    assert abs(hit.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / len(hit))
    np.testing.assert_array_equal(out[~erased], 7.0)
    assert (out != 7.0).all(-1)[erased].all()  # every channel of a box pixel
    assert all(_is_rectangle(mask) for mask in erased[hit])
    noise = out[erased]
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    masks, noises = erased[hit][:50], out[hit][:50]
    overlap = np.einsum("ihw,jhw->ij", masks.astype(int), masks.astype(int)) * (1 - np.eye(len(masks), dtype=int))
    first, second = np.unravel_index(overlap.argmax(), overlap.shape)
    both = masks[first] & masks[second]
    assert both.sum() > 10 and (noises[first][both] != noises[second][both]).all()  # each image its own noise
    assert scipy.stats.normaltest(noise[:5000, 0]).pvalue > 1e-3
    random.seed(0)
    torch.manual_seed(0)
    eraser = timm_re.RandomErasing(1.0, mode="pixel", max_count=1, device="cpu")
    timm_area = [(eraser(torch.full((3, 32, 40), 7.0))[0] != 7.0).float().mean().item() for _ in range(500)]
    assert scipy.stats.ks_2samp(erased[hit].mean((1, 2)), timm_area).pvalue > 1e-3


def test_modes_and_counts() -> None:
    images = jnp.full((200, 24, 24, 3), 7.0)
    const = np.asarray(_erase(jax.random.key(1), images, ErasingConfig(1.0, "const")))
    assert set(np.unique(const)) == {0.0, 7.0}
    colour = np.asarray(_erase(jax.random.key(1), images, ErasingConfig(1.0, "rand")))
    for sample in colour:
        box = (sample != 7.0).all(-1)
        assert box.any() and (sample[box] == sample[box][0]).all()  # one colour per box
    multi = np.asarray(_erase(jax.random.key(1), images, ErasingConfig(1.0, "const", recount=3)))
    masks = (multi == 0.0).all(-1)
    assert not all(_is_rectangle(mask) for mask in masks)  # 1 to 3 boxes
    assert masks.mean() < 1.1 * (const == 0.0).all(-1).mean()  # each of `count` boxes has 1 / count of the area


def test_deterministic_sharded_and_configured() -> None:
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    key = jax.random.key(3)
    sharded = _erase(key, jax.device_put(FLAT, sharding), MAE)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(_erase(key, FLAT, MAE)))
    other = np.asarray(_erase(jax.random.key(4), FLAT, MAE))
    both = (np.asarray(sharded) != 7.0) & (other != 7.0)  # erased under both keys
    assert both.sum() > 1000 and (np.asarray(sharded)[both] != other[both]).all()  # boxes and noise follow the key
    with pytest.raises(ValueError, match="remode"):
        ErasingConfig(remode="noise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="recount"):
        ErasingConfig(recount=0)
