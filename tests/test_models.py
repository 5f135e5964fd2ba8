"""Foundation tests: shapes, parameter counts against PyTorch, and the numerics MAE fixes."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from scipy.special import erf
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from semmae_jax.models import (
    create_model,
    frozen_param_names,
    model_family,
    model_names,
    patchify,
    random_masking,
    unpatchify,
)
from semmae_jax.models.layers import Mlp
from semmae_jax.models.mae import masked_patch_loss
from semmae_jax.models.pos_embed import sincos_2d


def abstract_params(name: str, **overrides):
    model = create_model(name, **overrides)
    size = model.img_size
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, x), images
    )
    return model, nn.unbox(variables["params"])


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_builds_with_the_right_output_shapes(name):
    model, params = abstract_params(name)
    size, p = model.img_size, model.patch_size
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    if model_family(name) == "mae":
        loss, pred, mask = jax.eval_shape(
            lambda prm, x: model.apply({"params": prm}, x, rngs={"mask": jax.random.key(0)}), params, images
        )
        length = (size // p) ** 2
        assert (loss.shape, pred.shape, mask.shape) == ((), (2, length, p * p * 3), (2, length))
        assert pred.dtype == jnp.float32
    else:
        logits = jax.eval_shape(lambda prm, x: model.apply({"params": prm}, x), params, images)
        assert logits.shape == (2, model.num_classes)


def _timm_vit(config) -> torch.nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        num_classes=config.num_classes,
        global_pool="avg" if config.global_pool else "token",
        fc_norm=config.global_pool,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    )


def _hf_mae(config) -> torch.nn.Module:
    return ViTMAEForPreTraining(
        ViTMAEConfig(
            image_size=config.img_size,
            patch_size=config.patch_size,
            hidden_size=config.embed_dim,
            num_hidden_layers=config.depth,
            num_attention_heads=config.num_heads,
            intermediate_size=4 * config.embed_dim,
            decoder_hidden_size=config.decoder_embed_dim,
            decoder_num_hidden_layers=config.decoder_depth,
            decoder_num_attention_heads=config.decoder_num_heads,
            decoder_intermediate_size=4 * config.decoder_embed_dim,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        )
    )


COUNT_CASES = [(name, {}) for name in model_names("mae")] + [
    (name, {"global_pool": pool}) for name in model_names("vit") for pool in (True, False)
]


@pytest.mark.parametrize(("name", "overrides"), COUNT_CASES)
def test_trainable_parameter_counts_equal_the_pytorch_references(name, overrides):
    """timm counts for classifiers, transformers' ViTMAE for MAE (built on torch's meta device)."""
    family = model_family(name)
    model, params = abstract_params(name, **overrides)
    frozen = frozen_param_names(model)
    ours = count({k: v for k, v in params.items() if k not in frozen})
    with torch.device("meta"):
        reference = _timm_vit(model) if family == "vit" else _hf_mae(model)
    theirs = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert ours == theirs
    if family == "mae":  # the fixed tables are the only non-trainable tensors on both sides
        assert count(params) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_patchify_orders_patches_row_col_channel_and_unpatchify_inverts_it(grid):
    p = 4
    images = jax.random.normal(jax.random.key(0), (2, grid[0] * p, grid[1] * p, 3))
    patches = patchify(images, p)
    assert patches.shape == (2, grid[0] * grid[1], p * p * 3)
    # Patch (1, 2) of image 0, pixel (row 3, col 1, channel 2) -> index (3*p + 1)*3 + 2.
    assert patches[0, 1 * grid[1] + 2, (3 * p + 1) * 3 + 2] == images[0, 1 * p + 3, 2 * p + 1, 2]
    np.testing.assert_array_equal(unpatchify(patches, p, grid), images)


def test_random_masking_invariants():
    n, length, ratio = 4, 64, 0.75
    x = jnp.arange(n * length, dtype=jnp.float32).reshape(n, length, 1)
    noise = jax.random.uniform(jax.random.key(0), (n, length))
    kept, mask, ids_restore = random_masking(x, ratio, noise)
    removed = length - int(length * (1 - ratio))
    np.testing.assert_array_equal(mask.sum(axis=1), removed)
    ids_shuffle = jnp.argsort(noise, axis=1)
    np.testing.assert_array_equal(
        jnp.take_along_axis(ids_shuffle, ids_restore, axis=1), np.tile(np.arange(length), (n, 1))
    )
    # The kept tokens are the lowest-noise ones, in noise order, and exactly the unmasked ones.
    expected_kept = np.take_along_axis(np.asarray(x[..., 0]), np.asarray(ids_shuffle[:, : length - removed]), axis=1)
    np.testing.assert_array_equal(kept[..., 0], expected_kept)
    for i in range(n):
        np.testing.assert_array_equal(
            np.sort(np.asarray(kept[i, :, 0]) - i * length), np.flatnonzero(np.asarray(mask[i]) == 0)
        )
    assert len({tuple(np.asarray(m)) for m in mask}) == n  # a different mask per sample
    _, mask_again, _ = random_masking(x, ratio, noise)
    np.testing.assert_array_equal(mask, mask_again)  # the same noise, the same mask


def test_sincos_table_matches_an_independent_per_token_derivation():
    dim, grid = 16, (3, 5)
    table = sincos_2d(dim, grid, cls_token=True)
    quarter = dim // 4
    omega = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
    expected = [[0.0] * dim]
    for row in range(grid[0]):
        for col in range(grid[1]):
            # The original's quirk: the first half encodes the column (w), the second the row (h).
            token = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
            token += [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
            expected.append(token)
    np.testing.assert_allclose(table, np.array(expected), atol=1e-6)
    assert table.dtype == np.float32


def test_a_non_square_mae_builds_its_tables_on_its_grid_and_names_the_images_it_expects():
    model = create_model("mae_vit_test_patch4", img_size=[24, 40])  # a JSON list is the same size
    assert (model.img_size, model.grid_hw, model.num_patches) == ((24, 40), (6, 10), 60)
    params = nn.unbox(model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                                 jnp.zeros((1, 24, 40, 3)))["params"])
    np.testing.assert_array_equal(params["pos_embed"][0], sincos_2d(32, (6, 10), cls_token=True))
    with pytest.raises(ValueError, match=r"expects images \[N, 24, 40, 3\] \(NHWC\), got \(1, 40, 24, 3\)"):
        model.apply({"params": params}, jnp.zeros((1, 40, 24, 3)), rngs={"mask": jax.random.key(0)})
    with pytest.raises(ValueError, match="image size 24x30 is not a multiple of the patch size 4 of model mae_vit_test_patch4"):
        create_model("mae_vit_test_patch4", img_size=(24, 30))


def test_mlp_uses_the_exact_erf_gelu():
    dim = 8
    mlp = Mlp(hidden_dim=dim)
    eye = {"kernel": jnp.eye(dim), "bias": jnp.zeros(dim)}
    x = jnp.linspace(-3, 3, dim)[None, None]
    out = mlp.apply({"params": {"fc1": eye, "fc2": eye}}, x)
    exact = 0.5 * np.asarray(x) * (1 + erf(np.asarray(x) / math.sqrt(2)))
    np.testing.assert_allclose(out, exact, atol=1e-6)
    assert np.abs(np.asarray(jax.nn.gelu(x, approximate=True)) - exact).max() > 1e-4  # the check can tell them apart


def test_norm_pix_target_uses_the_unbiased_variance():
    rng = np.random.RandomState(0)
    images = rng.randn(2, 8, 8, 3).astype(np.float32)
    pred = rng.randn(2, 4, 48).astype(np.float32)
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.float32)
    target = np.asarray(patchify(jnp.asarray(images), 4), np.float64)

    def expected(ddof):
        t = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=ddof, keepdims=True) + 1e-6)
        per_patch = ((pred - t) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    loss = float(masked_patch_loss(jnp.asarray(images), jnp.asarray(pred), jnp.asarray(mask), 4, True))
    assert loss == pytest.approx(expected(1), rel=1e-5)
    assert abs(expected(1) - expected(0)) > 1e-3 * expected(1)  # and the two are distinguishable


def test_initialisation_follows_mae():
    model = create_model("mae_vit_base_patch16")
    variables = jax.jit(model.init)(
        {"params": jax.random.key(0), "mask": jax.random.key(1)}, jnp.zeros((1, 224, 224, 3))
    )
    params = nn.unbox(variables["params"])
    dim, p = 768, 16

    def check_xavier(kernel, fan_in, fan_out):
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert np.abs(kernel).max() <= bound
        assert np.std(kernel) == pytest.approx(bound / math.sqrt(3), rel=0.02)

    block = params["blocks_0"]
    check_xavier(np.asarray(block["attn"]["qkv"]["kernel"]), dim, 3 * dim)  # torch's fused [3D, D] fans
    check_xavier(np.asarray(block["mlp"]["fc1"]["kernel"]), dim, 4 * dim)
    check_xavier(np.asarray(params["patch_embed"]["proj"]["kernel"]), 3 * p * p, dim)  # Linear fans, not conv fans
    patch_bias = np.asarray(params["patch_embed"]["proj"]["bias"])
    assert np.abs(patch_bias).max() <= (3 * p * p) ** -0.5 and np.abs(patch_bias).max() > 0.5 * (3 * p * p) ** -0.5
    np.testing.assert_array_equal(block["attn"]["qkv"]["bias"], 0)
    np.testing.assert_array_equal(block["norm1"]["scale"], 1)
    np.testing.assert_array_equal(block["norm1"]["bias"], 0)
    for token, width in (("cls_token", dim), ("mask_token", 512)):
        assert params[token].shape == (1, 1, width)
        assert np.std(params[token]) == pytest.approx(0.02, rel=0.15)
    np.testing.assert_array_equal(params["pos_embed"][0], sincos_2d(dim, 14, cls_token=True))
    np.testing.assert_array_equal(params["decoder_pos_embed"][0], sincos_2d(512, 14, cls_token=True))


def test_classifier_head_starts_near_zero():
    model = create_model("vit_test_patch4", num_classes=100)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    assert np.std(params["head"]["kernel"]) == pytest.approx(2e-5, rel=0.1)


@pytest.fixture(scope="module")
def tiny_mae():
    """A small MAE, its params, a batch and a fixed noise, shared to pay XLA's compile once."""
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(1), (2, 64))
    model = create_model("mae_vit_test_patch4")
    params = nn.unbox(jax.jit(model.init)({"params": jax.random.key(2)}, images, noise=noise)["params"])
    return params, images, noise


def _loss_and_grads(tiny, **overrides):
    params, images, noise = tiny
    model = create_model("mae_vit_test_patch4", **overrides)
    return jax.jit(jax.value_and_grad(lambda p: model.apply({"params": p}, images, noise=noise)[0]))(params)


def test_position_tables_get_no_gradient_but_everything_else_does(tiny_mae):
    _, grads = _loss_and_grads(tiny_mae)
    for name in ("pos_embed", "decoder_pos_embed"):
        np.testing.assert_array_equal(grads[name], 0)
    assert np.abs(grads["cls_token"]).max() > 0 and np.abs(grads["mask_token"]).max() > 0


def test_remat_changes_nothing_numerically(tiny_mae):
    loss, grads = _loss_and_grads(tiny_mae)
    loss_remat, grads_remat = _loss_and_grads(tiny_mae, remat=True)
    np.testing.assert_allclose(loss, loss_remat, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads_remat)


def test_bfloat16_compute_keeps_float32_params_loss_and_prediction(tiny_mae):
    params, images, noise = tiny_mae
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    model = create_model("mae_vit_test_patch4", dtype="bfloat16")
    loss, pred, _ = jax.jit(model.apply)({"params": params}, images, noise=noise)
    assert loss.dtype == jnp.float32 and pred.dtype == jnp.float32
    loss32 = jax.jit(create_model("mae_vit_test_patch4").apply)({"params": params}, images, noise=noise)[0]
    assert float(loss) == pytest.approx(float(loss32), rel=0.05)
    assert float(loss) != float(loss32)  # the compute really ran in bfloat16


def test_drop_path_is_active_in_training_only():
    """Against the same weights without drop path: equal in evaluation, different in training."""
    model = create_model("vit_test_patch4", drop_path_rate=0.5)
    plain = create_model("vit_test_patch4", drop_path_rate=0.0)
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), images)["params"])
    rngs = {"dropout": jax.random.key(2)}

    def outputs(m: nn.Module, train: bool) -> np.ndarray:
        return np.asarray(m.apply({"params": params}, images, train=train, rngs=rngs))

    np.testing.assert_array_equal(outputs(model, train=False), outputs(plain, train=False))
    np.testing.assert_array_equal(outputs(plain, train=True), outputs(plain, train=False))  # nothing else random
    reference = outputs(plain, train=True)
    assert np.abs(outputs(model, train=True) - reference).max() > 0.1 * np.abs(reference).max()


def test_bad_names_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'vit_tiny'"):
        create_model("vit_tiny")
    with pytest.raises(ValueError, match=r"no option\(s\) \['img_sz'\]"):
        create_model("vit_base_patch16", img_sz=384)
    with pytest.raises(ValueError, match="expects images"):
        model = create_model("vit_test_patch4")
        model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
