"""`pretrain --labelled_tokens K`: the MAE sees K part-labelled patches of each image, as the original's
ViT-B/8 saw its records' 196 of 784 positions (`configs/semmae_vit_base_patch8_196.py`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semmae_jax.cli import main as cli_main
from semmae_jax.masking import labelled_positions
from semmae_jax.models import create_model, patchify
from semmae_jax.runtime.run_log import epoch_lines

GRID, KEPT = 64, 16  # mae_vit_test_patch4 at 32 px: an 8 x 8 grid


@pytest.fixture(scope="module")
def tiny_mae():
    model = create_model("mae_vit_test_patch4", norm_pix_loss=True)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    params = nn.unbox(model.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, images)["params"])
    positions = jnp.asarray(np.sort(np.random.default_rng(1).permutation(GRID)[: 2 * KEPT].reshape(2, KEPT)), jnp.int32)
    return model, params, images, positions


def apply(model, params, images, noise, positions, mask_ratio=0.75):
    with jax.default_matmul_precision("float32"):
        (loss, pred, mask), state = model.apply({"params": params}, images, mask_ratio, noise, positions,
                                                mutable="intermediates")
    return loss, pred, mask, state["intermediates"]["latent"][0]


def test_labelled_positions_are_the_first_labelled_ones_in_grid_order():
    labels = np.full((2, 10), -1, np.int32)
    labels[0, [7, 2, 5]] = [0, 3, 1]
    labels[1, [1, 9]] = [2, 2]
    np.testing.assert_array_equal(labelled_positions(jnp.asarray(labels), 3), [[2, 5, 7], [1, 9, 0]])  # then unlabelled


def test_every_position_in_any_order_is_the_full_grid_reordered(tiny_mae):
    """Tokens carry their position rows (encoder and decoder tables alike) and attention has no order:
    the whole grid given in a shuffled order, with the noise shuffled alike, is the full-grid model's
    output in that order (a wrong table row anywhere would show)."""
    model, params, images, _ = tiny_mae
    noise = jax.random.uniform(jax.random.key(2), (2, GRID))
    order = jnp.stack([jax.random.permutation(jax.random.key(k), GRID) for k in (5, 6)]).astype(jnp.int32)
    loss, pred, mask, latent = apply(model, params, images, jnp.take_along_axis(noise, order, 1), order)
    full_loss, full_pred, full_mask, full_latent = apply(model, params, images, noise, None)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
    np.testing.assert_allclose(pred, np.take_along_axis(np.asarray(full_pred), np.asarray(order)[..., None], 1),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(mask, np.take_along_axis(np.asarray(full_mask), np.asarray(order), 1))
    np.testing.assert_allclose(latent, full_latent, rtol=1e-5, atol=1e-5)  # visible tokens in noise order, both


def test_the_encoder_sees_the_kept_patches_at_their_own_position_rows(tiny_mae):
    """With the other positions given noise above every kept one, the full-grid model keeps the same
    4 visible patches (mask ratio 15/16 of 64 = 4 of 16 at 0.75): the same encoder output."""
    model, params, images, positions = tiny_mae
    noise = jax.random.uniform(jax.random.key(3), (2, KEPT))
    full_noise = jnp.full((2, GRID), 2.0).at[jnp.arange(2)[:, None], positions].set(noise)
    *_, latent = apply(model, params, images, noise, positions)
    *_, full_latent = apply(model, params, images, full_noise, None, mask_ratio=1 - 4 / GRID)
    assert latent.shape == full_latent.shape == (2, 1 + 4, 32)
    np.testing.assert_allclose(latent, full_latent, rtol=1e-5, atol=1e-5)


def test_the_loss_is_over_the_masked_kept_patches_pixels(tiny_mae):
    model, params, images, positions = tiny_mae
    noise = jax.random.uniform(jax.random.key(4), (2, KEPT))
    loss, pred, mask, _ = apply(model, params, images, noise, positions)
    assert pred.shape == (2, KEPT, 4 * 4 * 3) and mask.shape == (2, KEPT) and float(mask.sum()) == 2 * 12
    target = np.take_along_axis(np.asarray(patchify(images, 4)), np.asarray(positions)[..., None], axis=1)
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((np.asarray(pred) - target) ** 2).mean(-1)
    np.testing.assert_allclose(loss, (per_patch * mask).sum() / mask.sum(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("demo_root")
def test_pretraining_on_labelled_tokens_runs_on_whole_images(tmp_path, capsys):
    """On a non-square grid too (24 x 40: 60 patches), semantic masking over the kept tokens' parts."""
    cli_main(["pretrain", "--model", "mae_vit_test_patch4", "--input_size", "24", "40", "--global_batch_size", "8",
              "--epochs", "1", "--steps_per_epoch", "2", "--warmup_epochs", "1", "--setting", "3",
              "--labelled_tokens", str(KEPT), "--vis_every", "1", "--output_dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert f"{KEPT} labelled tokens of 60 per image, whole images" in out
    trained = epoch_lines(tmp_path / "run")[-1]
    assert np.isfinite(trained["train_loss"]) and trained["train_alpha"] > 0
    assert (tmp_path / "run" / "reconstruction_epoch0000.png").is_file()
    with pytest.raises(SystemExit, match=f"--labelled_tokens {GRID + 1}: mae_vit_test_patch4 at 32 has {GRID} patches"):
        cli_main(["pretrain", "--model", "mae_vit_test_patch4", "--input_size", "32", "--labelled_tokens",
                  str(GRID + 1), "--output_dir", str(tmp_path / "refused")])
