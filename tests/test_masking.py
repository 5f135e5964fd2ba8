"""Semantic-guided masking: the counts against the formulas, the realised masks, the schedule.

The realised mask is read the way the model reads the noise (`random_masking`: argsort,
the `L - int(L * (1 - r))` largest removed). The flagged patches are read from the noise
too: they are the top of the masking order, so the `sum(c_k)` patches with the largest
noise must hold exactly c_k patches of each part k.
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from semmae_jax.masking import (
    MaskingSetting,
    alpha_schedule,
    masking_alpha,
    masking_noise,
    part_mask_counts,
    random_noise,
    semantic_noise,
)
from semmae_jax.models import random_masking

NUM_PARTS = 8
BATCH = 96  # one batch size (and few lengths) so that the jitted functions compile only a few times
jit_noise = jax.jit(semantic_noise, static_argnames=("mask_ratio", "num_parts"))
jit_random_masking = jax.jit(random_masking, static_argnums=1)


# ----------------------------------------------------------------------------- references


def reference_counts(sizes, order, num_patches, mask_ratio, alpha):
    """SPEC section 1 written out with Python ints and Python's round (half to even)."""
    budget = num_patches * mask_ratio
    inter = [0] * len(sizes)
    before = 0
    for k in order:
        inter[k] = min(sizes[k], max(0, math.floor(budget - before)))
        before += sizes[k]
    return [round((1 - alpha) * round(mask_ratio * n) + alpha * m) for n, m in zip(sizes, inter, strict=True)]


def masked_total(num_patches, mask_ratio):
    return num_patches - int(num_patches * (1 - mask_ratio))


def part_sizes(labels, num_parts=NUM_PARTS):
    return np.stack([(labels == k).sum(axis=1) for k in range(num_parts)], axis=1)


def per_part(selected, labels, num_parts=NUM_PARTS):
    """Counts of selected patches in each part [N, K] and among unlabelled ones [N]."""
    parts = np.stack([(selected & (labels == k)).sum(axis=1) for k in range(num_parts)], axis=1)
    return parts, (selected & (labels < 0)).sum(axis=1)


def top_of_order(noise, how_many):
    """Boolean [N, L]: the `how_many[i]` patches of row i with the largest noise."""
    rank_from_top = np.argsort(np.argsort(-noise, axis=1, kind="stable"), axis=1)
    return rank_from_top < np.asarray(how_many)[:, None]


def realised_mask(noise, mask_ratio):
    _, mask, _ = jit_random_masking(jnp.zeros((*noise.shape, 1)), mask_ratio, jnp.asarray(noise))
    return np.asarray(mask).astype(bool)


def random_part_maps(rng, batch, length, num_parts=NUM_PARTS):
    """Rows of several kinds: empty parts, one part, all unlabelled, few of K used, runs."""
    rows = []
    for i in range(batch):
        kind = i % 6
        if kind == 0:  # random proportions over -1..K-1, some parts often empty
            p = rng.dirichlet(np.full(num_parts + 1, 0.5))
            rows.append(rng.choice(np.arange(-1, num_parts), size=length, p=p))
        elif kind == 1:  # one part only
            rows.append(np.full(length, rng.integers(num_parts)))
        elif kind == 2:  # all unlabelled
            rows.append(np.full(length, -1))
        elif kind == 3:  # K larger than the parts present
            rows.append(rng.integers(-1, 3, size=length))
        elif kind == 4:  # contiguous runs, no unlabelled patch
            cuts = np.sort(rng.choice(np.arange(1, length), size=num_parts - 1, replace=False))
            rows.append(np.repeat(rng.permutation(num_parts), np.diff([0, *cuts, length])))
        else:  # a mostly unlabelled image
            rows.append(np.where(rng.random(length) < 0.7, -1, rng.integers(num_parts, size=length)))
    return np.stack(rows).astype(np.int32)


def noise_for(labels, mask_ratio, alpha, seed=0):
    return np.asarray(jit_noise(jax.random.key(seed), jnp.asarray(labels), mask_ratio=mask_ratio, alpha=alpha))


SHAPES = [(196, 0.75), (50, 0.75), (49, 0.6)]  # B = L * r integral, and not


# ----------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_part_mask_counts_match_formula(alpha):
    rng = np.random.default_rng(1)
    for length, mask_ratio in SHAPES:
        sizes = np.stack([rng.multinomial(length, rng.dirichlet(np.full(NUM_PARTS + 1, 0.4)))[:-1] for _ in range(300)])
        sizes[::7, 2:] = 0  # few parts
        orders = np.stack([rng.permutation(NUM_PARTS) for _ in range(len(sizes))])
        got = part_mask_counts(sizes, orders, num_patches=length, mask_ratio=mask_ratio, alpha=alpha)
        want = [
            reference_counts(s.tolist(), o.tolist(), length, mask_ratio, alpha)
            for s, o in zip(sizes, orders, strict=True)
        ]
        np.testing.assert_array_equal(np.asarray(got), np.array(want), err_msg=f"L={length} r={mask_ratio}")


# ----------------------------------------------------------------------------- realised masks


@pytest.mark.parametrize(("length", "mask_ratio"), SHAPES)
def test_intra_part_counts_exact(length, mask_ratio):
    labels = random_part_maps(np.random.default_rng(2), BATCH, length)
    noise = noise_for(labels, mask_ratio, alpha=0.0)
    sizes = part_sizes(labels)
    want = np.array([reference_counts(s.tolist(), range(NUM_PARTS), length, mask_ratio, 0.0) for s in sizes])
    flagged_total = want.sum(axis=1)
    flagged, flagged_unlabelled = per_part(top_of_order(noise, flagged_total), labels)
    np.testing.assert_array_equal(flagged, want)
    assert not flagged_unlabelled.any()

    total = masked_total(length, mask_ratio)
    masked, masked_unlabelled = per_part(realised_mask(noise, mask_ratio), labels)
    np.testing.assert_array_equal(masked.sum(axis=1) + masked_unlabelled, total)
    np.testing.assert_array_equal(masked_unlabelled, np.maximum(0, total - sizes.sum(axis=1)))
    exact, over, under = flagged_total == total, flagged_total > total, flagged_total < total
    np.testing.assert_array_equal(masked[exact], want[exact])
    assert (masked[over] <= want[over]).all() and (masked[under] >= want[under]).all()
    assert over.any() and exact.any() and under.any(), "the part maps miss one of the three cases"


@pytest.mark.parametrize(("length", "mask_ratio"), SHAPES)
def test_inter_part_counts_follow_some_part_order(length, mask_ratio):
    """alpha = 1: whole parts, then at most one partial part, the budget floor(L * r) filled."""
    labels = random_part_maps(np.random.default_rng(3), BATCH, length)
    noise = noise_for(labels, mask_ratio, alpha=1.0)
    sizes = part_sizes(labels)
    flagged_total = np.minimum(math.floor(length * mask_ratio), sizes.sum(axis=1))
    flagged, flagged_unlabelled = per_part(top_of_order(noise, flagged_total), labels)
    partial_parts = ((flagged > 0) & (flagged < sizes)).sum(axis=1)
    assert (partial_parts <= 1).all()
    np.testing.assert_array_equal(flagged.sum(axis=1), flagged_total)
    assert not flagged_unlabelled.any()
    assert (partial_parts == 1).any() and ((flagged == 0) & (sizes > 0)).any(), "no whole part left out"

    total = masked_total(length, mask_ratio)
    masked, masked_unlabelled = per_part(realised_mask(noise, mask_ratio), labels)
    np.testing.assert_array_equal(masked.sum(axis=1) + masked_unlabelled, total)
    assert (masked >= flagged).all()  # sum(c_k) <= floor(B) <= total: every flagged patch is removed
    np.testing.assert_array_equal(masked_unlabelled, np.maximum(0, total - sizes.sum(axis=1)))


def consistent_with_an_order(noise_row, labels_row, length, mask_ratio, alpha):
    """Whether some part order gives counts c whose top-sum(c) patches hold exactly c."""
    sizes = part_sizes(labels_row[None])[0].tolist()
    present = [k for k in range(NUM_PARTS) if sizes[k]]
    for order in itertools.permutations(present):
        want = np.array(reference_counts(sizes, order, length, mask_ratio, alpha))
        got, _ = per_part(top_of_order(noise_row[None], [want.sum()]), labels_row[None])
        if (got[0] == want).all():
            return True
    return False


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_blended_counts_follow_some_part_order(alpha):
    length, mask_ratio = 50, 0.75
    rng = np.random.default_rng(4)
    labels = rng.integers(-1, 5, size=(BATCH, length)).astype(np.int32)  # <= 5 parts: 120 orders to try
    labels[::4, : length // 2] = 0  # one big part, so the order matters
    noise = noise_for(labels, mask_ratio, alpha)
    for i in range(len(labels)):
        assert consistent_with_an_order(noise[i], labels[i], length, mask_ratio, alpha), f"row {i}"
    # alpha moved the counts: some row's flagged counts differ from the intra-part ones.
    intra = np.array(
        [reference_counts(s.tolist(), range(NUM_PARTS), length, mask_ratio, 0.0) for s in part_sizes(labels)]
    )
    flagged, _ = per_part(top_of_order(noise, intra.sum(axis=1)), labels)
    assert (flagged != intra).any()


def test_unlabelled_patches_are_masked_last():
    labels = random_part_maps(np.random.default_rng(5), BATCH, 196)
    for alpha in (0.0, 0.5, 1.0):
        noise = noise_for(labels, 0.75, alpha)
        lowest_labelled = np.where(labels >= 0, noise, np.inf).min(axis=1)
        highest_unlabelled = np.where(labels < 0, noise, -np.inf).max(axis=1)
        assert (highest_unlabelled < lowest_labelled).all()


def test_noise_is_a_strict_order_in_unit_interval():
    labels = random_part_maps(np.random.default_rng(6), BATCH, 196)
    noise = noise_for(labels, 0.75, 0.3)
    assert noise.dtype == np.float32 and noise.min() >= 0.0 and noise.max() < 1.0
    assert all(len(np.unique(row)) == row.size for row in noise)


# ----------------------------------------------------------------------------- randomness


DRAWS = 4096  # rows of one part map, each an independent draw


def test_flagged_subset_is_uniform_within_each_part():
    sizes = [5, 12, 20, 8]
    row = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)] + [np.full(3, -1)])
    labels = np.tile(np.random.default_rng(7).permutation(row), (DRAWS, 1)).astype(np.int32)
    length, mask_ratio = labels.shape[1], 0.75
    want = reference_counts([*sizes, 0, 0, 0, 0], range(NUM_PARTS), length, mask_ratio, 0.0)
    noise = noise_for(labels, mask_ratio, 0.0)
    rate = top_of_order(noise, np.full(len(labels), sum(want))).mean(axis=0)
    expected = np.array([want[k] / sizes[k] if k >= 0 else 0.0 for k in labels[0]])
    tolerance = 5 * np.sqrt(expected * (1 - expected) / len(labels)) + 1e-9
    assert (np.abs(rate - expected) <= tolerance).all(), np.abs(rate - expected).max()


def test_surplus_flags_are_dropped_uniformly():
    """sum(c_k) > total: each flagged patch is removed with the same chance total / sum(c_k).

    Six parts of 2 patches (all flagged) beside one of 36 (27 flagged): 39 flagged for 36
    removed. A tie order correlated with the subset draw would spare the big part's patches.
    """
    sizes = [2, 2, 2, 2, 2, 2, 36]
    labels = np.tile(np.repeat(np.arange(len(sizes)), sizes), (DRAWS, 1)).astype(np.int32)
    want = np.array(reference_counts([*sizes, 0], range(NUM_PARTS), 48, 0.75, 0.0))
    assert want.sum() == 39 and masked_total(48, 0.75) == 36
    masked, _ = per_part(realised_mask(noise_for(labels, 0.75, 0.0), 0.75), labels)
    groups = np.stack([masked[:, :6].sum(axis=1), masked[:, 6]], axis=1)  # the small parts pooled, the big one
    expected = np.array([want[:6].sum(), want[6]]) * 36 / 39
    tolerance = 5 * groups.std(axis=0) / np.sqrt(DRAWS)
    assert (np.abs(groups.mean(axis=0) - expected) <= tolerance).all(), (groups.mean(axis=0), expected, tolerance)


def test_each_sample_draws_its_own_mask():
    labels = np.tile(random_part_maps(np.random.default_rng(8), 5, 196)[4], (BATCH, 1))
    noise = noise_for(labels, 0.75, 1.0)
    assert len(np.unique(noise, axis=0)) == len(noise)
    flagged, _ = per_part(top_of_order(noise, np.full(len(labels), 147)), labels)
    whole = flagged == part_sizes(labels)
    assert whole.any(axis=0).all() and (~whole).any(axis=0).all(), "every part is sometimes whole, sometimes not"
    # A sample's noise does not depend on the other samples' labels.
    changed = labels.copy()
    changed[1:] = np.roll(changed[1:], 3, axis=1)
    np.testing.assert_array_equal(noise_for(changed, 0.75, 1.0)[0], noise[0])


def test_fixed_key_is_deterministic():
    labels = random_part_maps(np.random.default_rng(9), BATCH, 196)
    np.testing.assert_array_equal(noise_for(labels, 0.75, 0.5, seed=3), noise_for(labels, 0.75, 0.5, seed=3))
    assert (noise_for(labels, 0.75, 0.5, seed=3) != noise_for(labels, 0.75, 0.5, seed=4)).any()


# ----------------------------------------------------------------------------- schedule, settings


def test_alpha_schedule():
    assert alpha_schedule(0.0) == 0.0 and alpha_schedule(1.0) == 1.0
    assert alpha_schedule(0.5) == pytest.approx(0.25)
    assert alpha_schedule(0.25, gamma=0.5) == pytest.approx(0.5)
    assert alpha_schedule(0.3, gamma=1.0) == pytest.approx(0.3)
    assert alpha_schedule(0.9, gamma=3.0) == pytest.approx(0.729)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="progress"):
            alpha_schedule(bad)
    with pytest.raises(ValueError, match="gamma"):
        alpha_schedule(0.5, gamma=0.0)


def test_masking_alpha_per_setting():
    assert masking_alpha(MaskingSetting.INTRA_PART, 0.7) == 0.0
    assert masking_alpha(MaskingSetting.INTER_PART, 0.1) == 1.0
    assert masking_alpha(3, 0.5, gamma=2.0) == pytest.approx(0.25)
    assert masking_alpha(MaskingSetting.ADAPTIVE, 0.5, gamma=1.0) == pytest.approx(0.5)
    assert masking_alpha(0, 0.5) == 0.0
    with pytest.raises(ValueError):
        masking_alpha(4, 0.5)


def test_masking_noise_dispatches_on_setting():
    key, labels = jax.random.key(11), jnp.asarray(random_part_maps(np.random.default_rng(10), 6, 49))
    np.testing.assert_array_equal(
        masking_noise(key, labels, setting=MaskingSetting.RANDOM, mask_ratio=0.75, alpha=0.5), random_noise(key, 6, 49)
    )

    # Settings 1-3 trace to exactly semantic_noise's computation (compared as jaxprs: no compile).
    def traced(function, **static):
        return str(jax.make_jaxpr(partial(function, mask_ratio=0.75, **static))(key, labels, alpha=0.5))

    semantic = traced(semantic_noise)
    assert [traced(masking_noise, setting=s) == semantic for s in MaskingSetting] == [False, True, True, True]


def test_random_noise_is_uniform_per_sample():
    noise = np.asarray(random_noise(jax.random.key(12), 64, 196))
    assert noise.shape == (64, 196) and noise.dtype == np.float32
    assert noise.min() >= 0.0 and noise.max() < 1.0 and abs(noise.mean() - 0.5) < 0.01
    assert len(np.unique(np.argsort(noise, axis=1), axis=0)) == 64


def test_rejects_bad_labels():
    with pytest.raises(ValueError, match="integer"):
        semantic_noise(jax.random.key(0), jnp.zeros((2, 4), jnp.float32), mask_ratio=0.75, alpha=0.0)
    with pytest.raises(ValueError, match="integer"):
        semantic_noise(jax.random.key(0), jnp.zeros((4,), jnp.int32), mask_ratio=0.75, alpha=0.0)


# ----------------------------------------------------------------------------- jit and sharding


def test_traced_alpha_does_not_recompile():
    traces = []

    @jax.jit
    def step(key, labels, alpha):
        traces.append(None)
        return semantic_noise(key, labels, mask_ratio=0.75, alpha=alpha)

    key, labels = jax.random.key(13), jnp.asarray(random_part_maps(np.random.default_rng(11), BATCH, 196))
    outputs = {alpha: step(key, labels, alpha) for alpha in (0.0, 0.4, 1.0)}
    assert len(traces) == 1
    for alpha, noise in outputs.items():
        np.testing.assert_array_equal(noise, jit_noise(key, labels, mask_ratio=0.75, alpha=alpha))
    assert (np.asarray(outputs[0.0]) != np.asarray(outputs[1.0])).any()


def test_sharded_batch_gives_the_same_noise():
    assert len(jax.devices()) == 8, "tests/conftest.py should provide 8 host devices"
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    labels = jnp.asarray(random_part_maps(np.random.default_rng(12), BATCH, 196))
    key = jax.random.key(14)
    step = jax.jit(partial(masking_noise, setting=MaskingSetting.ADAPTIVE, mask_ratio=0.75))
    sharded = step(key, jax.device_put(labels, batch), alpha=0.6)
    assert sharded.sharding.is_equivalent_to(batch, 2)
    np.testing.assert_array_equal(sharded, jit_noise(key, labels, mask_ratio=0.75, alpha=0.6))
