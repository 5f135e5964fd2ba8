"""Mixup / CutMix and the soft-target losses against timm's `Mixup` and losses.

timm draws with numpy's global RNG; to compare outputs the tests replay the decisions
this module drew (lambda, CutMix or Mixup, box) through timm by patching `np.random` and
`rand_bbox`, and compare timm's `rand_bbox` with ours on the same centre draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from timm.data import mixup as timm_mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from semmae_jax.data.mixup import (
    MixParams,
    MixupConfig,
    label_smoothing_cross_entropy,
    mix_images,
    mixup,
    mixup_target,
    rand_bbox,
    sample_mix_params,
    smooth_one_hot,
    soft_target_cross_entropy,
)

B, H, W, C, CLASSES = 8, 12, 20, 3, 10
# One configuration per mode, shared by the tests so that each compiles once: 'batch' is MAE's recipe;
# 'pair' and 'elem' are gated by mixup_prob, and 'pair' draws its CutMix boxes by cutmix_minmax.
CONFIGS = {
    "batch": MixupConfig(mixup=0.8, cutmix=1.0, nb_classes=CLASSES),
    "pair": MixupConfig(0.8, 1.0, (0.2, 0.8), mixup_prob=0.7, mixup_mode="pair", nb_classes=CLASSES),
    "elem": MixupConfig(0.8, 1.0, mixup_prob=0.7, mixup_mode="elem", nb_classes=CLASSES),
}


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, H, W, C)).astype(np.float32)
    labels = rng.permutation(CLASSES)[:B].astype(np.int32)  # distinct, so each target column is one image's
    return images, labels


# jitted once per configuration: op-by-op dispatch would dominate the run time
_sample = jax.jit(sample_mix_params, static_argnums=(1, 2, 3, 4))
_mix_images = jax.jit(mix_images)
_mixup_target = jax.jit(mixup_target, static_argnums=(1, 3))


def _params(config: MixupConfig, seed: int) -> MixParams:
    return _sample(jax.random.key(seed), config, B, H, W)


# ------------------------------------------------------------------ targets / lambdas


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_targets_sum_to_one_and_carry_the_lambdas(mode: str) -> None:
    config = CONFIGS[mode]
    _, labels = _batch()
    for seed in range(6):
        params = _params(config, seed)
        targets = np.asarray(_mixup_target(jnp.asarray(labels), CLASSES, params.lam, 0.1))
        np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
        lam = np.asarray(params.lam)
        off = 0.1 / CLASSES
        own = targets[np.arange(B), labels]
        partner = targets[np.arange(B), labels[::-1]]
        np.testing.assert_allclose(own, lam * (1 - 0.1) + off, atol=1e-6)
        np.testing.assert_allclose(partner, (1 - lam) * (1 - 0.1) + off, atol=1e-6)
        assert ((lam >= 0) & (lam <= 1)).all()
        if mode == "batch":
            assert (lam == lam[0]).all() and (np.asarray(params.blend) == params.blend[0]).all()
        if mode == "pair":
            np.testing.assert_array_equal(lam, lam[::-1])
            np.testing.assert_array_equal(params.box, params.box[::-1])


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_pixels_follow_the_parameters(mode: str) -> None:
    """Image i filled with the value i: Mixup pixels are lam i + (1 - lam)(B - 1 - i); CutMix
    takes the partner's pixels on exactly a 1 - lam share of the image (lambda corrected)."""
    config = CONFIGS[mode]
    images = np.broadcast_to(np.arange(B, dtype=np.float32)[:, None, None, None], (B, H, W, C))
    seen = set()
    for seed in range(8):
        params = _params(config, seed)
        mixed = np.asarray(_mix_images(jnp.asarray(images), params))
        for i in range(B):
            lam, partner = float(params.lam[i]), B - 1 - i
            if params.blend[i]:
                np.testing.assert_allclose(mixed[i], lam * i + (1 - lam) * partner, rtol=1e-6)
                seen.add("mixup")
            else:
                assert set(np.unique(mixed[i])) <= {i, partner}
                np.testing.assert_allclose((mixed[i] == partner).mean(), 1 - lam, atol=1e-6)
                seen.add("cutmix")
    assert seen == {"mixup", "cutmix"}


def _many(config: MixupConfig, calls: int) -> MixParams:
    """`calls` batches of draws, concatenated (many calls of one compiled function, not one new shape)."""
    draws = [_sample(jax.random.key(seed), config, B, H, W) for seed in range(calls)]
    return MixParams(*(np.concatenate(column) for column in zip(*draws, strict=True)))


def test_decision_and_lambda_distributions() -> None:
    """Over many draws: mixup_prob gates the mix, CutMix half the time, Mixup's lambda ~ Beta(0.8, 0.8),
    CutMix's corrected lambda distributed as timm's `cutmix_bbox_and_lam` makes it."""
    params = _many(CONFIGS["elem"], 500)
    lam, blend = params.lam, params.blend
    mixed = lam != 1.0
    assert abs(mixed.mean() - 0.7) < 4 * np.sqrt(0.21 / len(lam))
    assert abs(blend[mixed].mean() - 0.5) < 4 * np.sqrt(0.25 / mixed.sum())
    assert scipy.stats.kstest(lam[blend], scipy.stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
    np.random.seed(0)
    timm_lam = [timm_mixup.cutmix_bbox_and_lam((H, W), np.random.beta(1.0, 1.0))[1] for _ in range(2000)]
    assert scipy.stats.ks_2samp(lam[mixed & ~blend], timm_lam).pvalue > 1e-3


def test_minmax_boxes_within_bounds() -> None:
    params = _many(CONFIGS["pair"], 100)
    cut = ~params.blend & (params.lam != 1.0)
    box, lam = params.box[cut], params.lam[cut]
    assert len(box) > 100
    sides = np.stack([box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]], 1)
    assert (sides[:, 0] >= int(H * 0.2)).all() and (sides[:, 0] < int(H * 0.8)).all()
    assert (sides[:, 1] >= int(W * 0.2)).all() and (sides[:, 1] < int(W * 0.8)).all()
    assert (box[:, 1] <= H).all() and (box[:, 3] <= W).all() and (box >= 0).all()
    np.testing.assert_allclose(lam, 1 - sides.prod(1) / (H * W), atol=1e-6)


# ------------------------------------------------------------------------ vs timm


def test_rand_bbox_equals_timms(monkeypatch: pytest.MonkeyPatch) -> None:
    centre: list[int] = []
    monkeypatch.setattr(np.random, "randint", lambda *a, **k: centre.pop(0))
    rng = np.random.default_rng(0)
    for height, width in [(12, 20), (224, 224)]:
        for lam in rng.uniform(0, 1, 100).astype(np.float32):
            cy, cx = int(rng.integers(height)), int(rng.integers(width))
            centre[:] = [cy, cx]
            expected = timm_mixup.rand_bbox((1, C, height, width), float(lam))
            got = rand_bbox(jnp.float32(lam), jnp.int32(cy), jnp.int32(cx), height, width)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected, dtype=np.int64))


def _replay_in_timm(
    monkeypatch: pytest.MonkeyPatch, params: MixParams, config: MixupConfig, images: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """timm's `Mixup` output when its numpy draws are made to take our decisions."""
    n = {"batch": 1, "pair": B // 2, "elem": B}[config.mixup_mode]
    lam, blend, box = (np.asarray(p)[:n] for p in params)
    cutmix = ~blend & (box[:, 1] > box[:, 0])
    mixed = blend | cutmix
    switch, gate = np.where(cutmix, 0.0, 0.99), np.where(mixed, 0.0, 0.99)
    beta = np.where(blend, lam, 0.5)
    if config.mixup_mode == "batch":  # scalars: gate, then switch; one beta
        rands, betas = iter([gate[0], switch[0]]), iter([beta[0]])
    else:  # arrays: switch, then gate; the CutMix betas, then the Mixup betas
        rands, betas = iter([switch, gate]), iter([beta, beta])
    boxes = iter(tuple(b) for b in box[cutmix])
    monkeypatch.setattr(np.random, "rand", lambda *a: next(rands))
    monkeypatch.setattr(np.random, "beta", lambda *a, **k: next(betas))
    for sampler in ("rand_bbox", "rand_bbox_minmax"):
        monkeypatch.setattr(timm_mixup, sampler, lambda *a, **k: next(boxes))
    timm = timm_mixup.Mixup(
        mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, cutmix_minmax=config.cutmix_minmax, prob=config.mixup_prob,
        switch_prob=config.mixup_switch_prob, mode=config.mixup_mode, label_smoothing=config.smoothing,
        num_classes=CLASSES,
    )  # fmt: skip
    x, target = timm(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels).long())
    return x.numpy().transpose(0, 2, 3, 1), target.numpy()


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixed_batch_equals_timms(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    config = CONFIGS[mode]
    images, labels = _batch(1)
    kinds = set()
    for seed in range(10):
        params = _params(config, seed)
        kinds.update(np.where(params.blend, "mixup", np.where(params.lam < 1, "cutmix", "none")).tolist())
        ours = np.asarray(_mix_images(jnp.asarray(images), params))
        targets = np.asarray(_mixup_target(jnp.asarray(labels), CLASSES, params.lam, config.smoothing))
        timm_images, timm_targets = _replay_in_timm(monkeypatch, params, config, images, labels)
        np.testing.assert_allclose(ours, timm_images, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(targets, timm_targets, rtol=1e-6, atol=1e-7)
    assert {"mixup", "cutmix"} <= kinds


def test_losses_equal_timms() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(16, CLASSES)).astype(np.float32)
    labels = rng.integers(CLASSES, size=16)
    targets = rng.dirichlet(np.ones(CLASSES), size=16).astype(np.float32)
    expected_soft = SoftTargetCrossEntropy()(torch.from_numpy(logits), torch.from_numpy(targets)).item()
    expected_ls = LabelSmoothingCrossEntropy(0.1)(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    got_soft = float(soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
    got_ls = float(label_smoothing_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1))
    np.testing.assert_allclose(got_soft, expected_soft, rtol=1e-6)
    np.testing.assert_allclose(got_ls, expected_ls, rtol=1e-6)
    smoothed = smooth_one_hot(jnp.asarray(labels), CLASSES, 0.1)
    np.testing.assert_allclose(float(soft_target_cross_entropy(jnp.asarray(logits), smoothed)), got_ls, rtol=1e-6)


# ------------------------------------------------------------------ the step's entry


def test_mixup_off_passes_images_and_smooths_labels() -> None:
    images, labels = _batch()
    out, targets = mixup(jax.random.key(0), jnp.asarray(images), jnp.asarray(labels), MixupConfig(nb_classes=CLASSES))
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(targets, smooth_one_hot(jnp.asarray(labels), CLASSES, 0.1))


def test_jitted_on_a_sharded_batch_equals_the_unsharded_parts() -> None:
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    images, labels = _batch(2)
    key, config = jax.random.key(0), CONFIGS["elem"]
    step = jax.jit(mixup, static_argnames="config")
    mixed, targets = step(key, jax.device_put(images, sharding), jax.device_put(labels, sharding), config=config)
    assert mixed.sharding.is_equivalent_to(sharding, 4)
    params = _sample(key, config, B, H, W)
    np.testing.assert_allclose(mixed, _mix_images(jnp.asarray(images), params), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, _mixup_target(labels, CLASSES, params.lam, 0.1), rtol=1e-6, atol=1e-7)
    again = step(key, jax.device_put(images, sharding), jax.device_put(labels, sharding), config=config)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(mixed))


def test_errors() -> None:
    with pytest.raises(ValueError, match="mixup_mode"):
        MixupConfig(mixup=0.8, mixup_mode="row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="even batch"):
        sample_mix_params(jax.random.key(0), CONFIGS["batch"], 7, H, W)
    with pytest.raises(ValueError, match="mixing is off"):
        sample_mix_params(jax.random.key(0), MixupConfig(), B, H, W)
