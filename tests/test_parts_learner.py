"""The part learner, its losses, the baselines and the metrics, on tiny inputs."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semmae_jax.parts import (
    LossWeights,
    PartLearner,
    PartModel,
    assign_parts,
    attention_parts,
    backbone_model,
    fit_kmeans,
    frozen_backbone,
    gaussian_blur,
    kmeans_parts,
    part_losses,
    part_scores,
)
from semmae_jax.parts.learner import PartTokens
from semmae_jax.parts.losses import diversity_loss, foreground_area, token_reconstruction_loss
from semmae_jax.train import optim

BATCH, GRID, DIM = 2, 4, 16


def tokens(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((BATCH, DIM)), jnp.float32), jnp.asarray(
        rng.standard_normal((BATCH, GRID * GRID, DIM)), jnp.float32)


@pytest.mark.parametrize(("background", "grid"), [(False, (GRID, GRID)), (True, (GRID, GRID)), (False, (2, 8))])
def test_learner_shapes_and_maps_sum_to_one(background, grid):
    learner = PartLearner(num_parts=3, background=background, blur_sigma=0.7, decoder_width=8, decoder_upsamples=2)
    cls, patches = tokens()
    variables = learner.init(jax.random.key(0), cls, patches, grid)
    maps, blurred, token_recon, image = learner.apply(variables, cls, patches, grid)
    parts = 3 + background
    assert maps.shape == blurred.shape == (BATCH, parts, *grid)
    assert token_recon.shape == patches.shape and image.shape == (BATCH, 4 * grid[0], 4 * grid[1], 3)
    # row-major: a map's row r holds the tokens r * columns .. (r + 1) * columns - 1
    queries = PartTokens(parts).apply({"params": variables["params"]["part_tokens"]}, cls)
    logits = jnp.einsum("bpd,bld->bpl", queries, patches) / np.sqrt(DIM)
    np.testing.assert_allclose(maps, jax.nn.softmax(logits, axis=1).reshape(BATCH, parts, *grid), atol=1e-6)
    np.testing.assert_allclose(maps.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(blurred.sum(axis=1), 1.0, atol=1e-6)
    assert float(jnp.abs(blurred - maps).max()) > 1e-3  # the blur did something


def test_blur_keeps_constants_and_spreads_a_point():
    point = jnp.zeros((1, 1, 7, 7)).at[0, 0, 3, 3].set(1.0)
    blurred = gaussian_blur(point, 1.0)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-6) and float(blurred[0, 0, 3, 3]) < 0.5
    np.testing.assert_allclose(gaussian_blur(jnp.full((1, 2, 5, 5), 0.25), 1.5), 0.25, atol=1e-6)
    assert gaussian_blur(point, 0.0) is point


def test_diversity_falls_as_maps_become_distinct():
    """Largest for identical (uniform) maps, falling steadily as each position goes to one map."""
    rng = np.random.default_rng(0)
    owner = jax.nn.one_hot(rng.integers(0, 4, (2, 6, 6)), 4).transpose(0, 3, 1, 2)
    values = [float(diversity_loss((1 - t) * jnp.full_like(owner, 0.25) + t * owner)) for t in np.linspace(0, 1, 5)]
    assert values[0] == pytest.approx(0.75) and values[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(values))


def test_token_loss_and_foreground_area():
    _, patches = tokens()
    assert float(token_reconstruction_loss(patches, patches)) == 0.0
    image_mean = jnp.broadcast_to(patches.mean(axis=1, keepdims=True), patches.shape)
    assert float(token_reconstruction_loss(patches, image_mean)) == pytest.approx(1.0, rel=1e-5)
    maps = jnp.zeros((1, 3, 2, 2)).at[:, 2].set(1.0).at[0, :, 0, 0].set(jnp.array([0.5, 0.5, 0.0]))
    assert float(foreground_area(maps)) == pytest.approx(0.25)


def test_assign_parts_marks_the_background_and_upsamples():
    maps = jnp.zeros((1, 3, 2, 2)).at[0, 0, 0, 0].set(1).at[0, 1, 0, 1].set(1).at[0, 2, 1].set(1)
    np.testing.assert_array_equal(assign_parts(maps, background=True)[0], [[0, 1], [-1, -1]])
    np.testing.assert_array_equal(assign_parts(maps, background=False)[0], [[0, 1], [2, 2]])
    assert assign_parts(maps, background=True, scale=4).shape == (1, 8, 8)


def test_backbone_gets_no_gradient_and_no_optimizer_state():
    model = PartModel(backbone_model("vit_test_patch4"), PartLearner(num_parts=2, decoder_width=8), feature_loss=True)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    params = model.init(jax.random.key(0), images)["params"]
    weights = LossWeights(features=1.0)

    def loss(p):
        return part_losses(model.apply({"params": frozen_backbone(p)}, images), images, weights, False)[0]

    grads = jax.grad(loss)(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["backbone"]))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["learner"]))
    tx = optim.adamw(params, optax.constant_schedule(1e-2), weight_decay=0.05, betas=(0.9, 0.999), frozen=("backbone",))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["backbone"]))


def test_losses_report_every_weighted_term():
    model = PartModel(backbone_model("vit_test_patch4"), PartLearner(num_parts=2, background=True, decoder_width=8))
    images = jnp.zeros((2, 32, 32, 3))
    outputs = model.apply(model.init(jax.random.key(0), images), images)
    total, metrics = part_losses(outputs, images, LossWeights(foreground=0.5), background=True)
    assert set(metrics) == {"loss", "pixels", "tokens", "diversity", "foreground"}
    expected = metrics["pixels"] + metrics["tokens"] + metrics["diversity"] + 0.5 * metrics["foreground"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


def test_metrics_are_perfect_for_a_renamed_ground_truth():
    true = np.random.default_rng(0).integers(0, 4, (5, 16))
    renamed = np.array([2, 0, 3, 1])[true]
    scores = part_scores(renamed, true)
    assert (scores.miou, scores.ari, scores.ari_per_image) == (1.0, 1.0, 1.0)
    assert scores.matching == (2, 0, 3, 1)  # the predicted id of each true part


def test_metrics_on_a_hand_made_case():
    true = np.array([[0, 0, 1, 1, -1]])  # -1: unlabelled, ignored
    pred = np.array([[5, 5, 5, 7, 7]])
    scores = part_scores(pred, true)
    assert scores.iou == pytest.approx((2 / 3, 1 / 2))  # 5 <-> 0: 2 of 3; 7 <-> 1: 1 of 2 (the -1 ignored)
    assert scores.miou == pytest.approx(7 / 12)
    one_part = part_scores(np.zeros_like(true), true)
    assert one_part.iou == pytest.approx((0.5, 0.0)) and one_part.ari == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        part_scores(-pred, true)


def test_baselines():
    attention = np.zeros((1, 3, 4))
    attention[0, [2, 0, 1, 2], range(4)] = 1.0
    np.testing.assert_array_equal(attention_parts(attention), [[2, 0, 1, 2]])
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 10
    labels = rng.integers(0, 3, (6, 10))
    points = centres[labels] + rng.standard_normal((6, 10, 8)) * 0.1
    found = kmeans_parts(fit_kmeans(points, 3, max_tokens=40), points)
    assert part_scores(found, labels).ari == 1.0
