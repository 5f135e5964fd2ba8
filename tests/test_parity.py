"""Converted weights compute what PyTorch computes: timm for classifiers, transformers for MAE.

Every reference gets random weights of a real scale (`randomize_`: no zero
biases, no unit LayerNorm scales, logits of order 1-10), so a wrong path cannot hide.
Both sides run in float32 (`jax.default_matmul_precision('float32')`) on a batch of 2.
The last tests drive `python main.py parity` itself on small models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_helpers import images, jax_apply, masking_noise, nchw, numpy_state_dict, pth_layout, randomize_

import semmae_jax.data
from convert import torch_to_flax
from convert.arch import Architecture, full_config
from convert.parity import forward as parity
from convert.parity import references
from convert.safe_load import save_torch_checkpoint
from convert.table import unflatten
from semmae_jax.models import create_model

ATOL = 1e-4  # max abs difference of logits, pred and features
LOSS_RTOL = 1e-5


@pytest.mark.parametrize("global_pool", [True, False], ids=["global_pool", "cls"])
@pytest.mark.parametrize("name", ["vit_base_patch16", "vit_base_patch8"])
def test_classifier_logits_match_timm(name, global_pool):
    config = full_config(name, global_pool=global_pool)
    reference = randomize_(references.timm_classifier(config), seed=0)
    params, inferred, overrides = torch_to_flax(numpy_state_dict(reference))
    assert (inferred, overrides) == (name, {} if global_pool else {"global_pool": False})
    x = images(config)
    with torch.no_grad():
        expected = reference(nchw(x)).numpy()
    logits = jax_apply(create_model(name, **overrides), params, x)
    assert np.abs(expected).max() > 1.0  # logits of a real scale, so 1e-4 is a real bound
    np.testing.assert_allclose(logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("global_pool", [True, False], ids=["global_pool", "cls"])
def test_non_square_classifier_logits_match_timm(global_pool):
    """timm's ViT at img_size=(24, 40): its state dict read at that size, the same logits."""
    config = full_config("vit_test_patch4", img_size=(24, 40), global_pool=global_pool)
    reference = randomize_(references.timm_classifier(config), seed=2)
    params, name, overrides = torch_to_flax(numpy_state_dict(reference), img_size=(24, 40))
    assert name == "vit_test_patch4" and overrides["img_size"] == (24, 40)
    x = images(config)
    assert x.shape[1:3] == (24, 40)
    with torch.no_grad():
        expected = reference(nchw(x)).numpy()
    logits = jax_apply(create_model(name, **overrides), params, x)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=ATOL)


def test_layer_norm_eps_is_1e6_where_it_matters():
    """Random weights give LayerNorm inputs of variance >> eps, where eps cannot be seen; shrink
    the embeddings so the first LayerNorm sees variance ~1e-6, and eps (MAE's 1e-6, timm's
    default 1e-5) decides the logits: JAX must agree with eps 1e-6, and visibly not 1e-5."""
    config = full_config("vit_test_patch4", global_pool=False)
    reference = randomize_(references.timm_classifier(config), seed=4)
    with torch.no_grad():
        for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
            reference.get_parameter(name).mul_(1e-3)
    state_dict = numpy_state_dict(reference)
    params, name, overrides = torch_to_flax(state_dict)
    x = images(config)
    logits = jax_apply(create_model(name, **overrides), params, x)
    with torch.no_grad():
        expected = reference(nchw(x)).numpy()
        timm_default = references.timm_classifier(config)
        for module in timm_default.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = 1e-5
        references.load_numpy_state_dict(timm_default, state_dict)
        with_default_eps = timm_default(nchw(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=ATOL)
    assert np.abs(with_default_eps - expected).max() > 100 * ATOL


@pytest.fixture(scope="module")
def mae_base(tmp_path_factory):
    """A transformers MAE of `mae_vit_base_patch16`'s shape and its weights in the `.pth` layout."""
    config = full_config("mae_vit_base_patch16")
    reference = randomize_(references.hf_mae(config), seed=1)
    return reference, pth_layout(reference, tmp_path_factory.mktemp("mae_base")), config


@pytest.mark.parametrize("norm_pix_loss", [False, True], ids=["pixels", "norm_pix_loss"])
def test_mae_loss_pred_mask_match_transformers(mae_base, norm_pix_loss):
    reference, state_dict, config = mae_base
    reference.config.norm_pix_loss = norm_pix_loss
    params, name, overrides = torch_to_flax(state_dict)
    assert (name, overrides) == ("mae_vit_base_patch16", {})
    x, noise = images(config), masking_noise(config)
    with torch.no_grad():
        expected = reference(nchw(x), noise=torch.from_numpy(noise))
    model = create_model(name, norm_pix_loss=norm_pix_loss)
    loss, pred, mask = jax_apply(model, params, x, mask_ratio=0.75, noise=noise)
    np.testing.assert_array_equal(mask, expected.mask.numpy())
    np.testing.assert_allclose(pred, expected.logits.numpy(), rtol=0, atol=ATOL)
    assert abs(float(loss) - expected.loss.item()) <= LOSS_RTOL * abs(expected.loss.item())


def test_encoder_only_features_match_vitmae_model(tmp_path):
    """An encoder-only file: MAE's masked `forward_encoder` and the unmasked feature extractor
    it converts to both equal transformers' `ViTMAEModel`."""
    config = full_config("mae_vit_base_patch16")
    reference = randomize_(references.hf_mae(config, encoder_only=True), seed=2)
    params, name, overrides = torch_to_flax(pth_layout(reference, tmp_path))
    assert (name, overrides) == ("vit_base_patch16", {"num_classes": 0, "global_pool": False})
    x, noise = images(config), masking_noise(config)

    mae = create_model("mae_vit_base_patch16")
    placeholders = {p: np.zeros(s, np.float32) for p, s in Architecture("mae_vit_base_patch16").flax_shapes().items()}
    mae_params = {**unflatten(placeholders), **params}  # the file's encoder; the decoder is never run
    latent, _, _ = jax_apply(mae, mae_params, x, mask_ratio=0.75, noise=noise, method=mae.forward_encoder)
    with torch.no_grad():
        expected = reference(nchw(x), noise=torch.from_numpy(noise)).last_hidden_state.numpy()
    np.testing.assert_allclose(latent, expected, rtol=0, atol=ATOL)

    vit = create_model(name, **overrides)
    tokens = jax_apply(vit, params, x, method=vit.tokens)
    reference.config.mask_ratio = 0.0  # keep every patch, in order (increasing noise)
    with torch.no_grad():
        in_order = torch.arange(noise.shape[1], dtype=torch.float32).expand(len(x), -1)
        expected = reference(nchw(x), noise=in_order).last_hidden_state.numpy()
    np.testing.assert_allclose(tokens, expected, rtol=0, atol=ATOL)


# --- python main.py parity ---------------------------------------------------------------


def small_checkpoints(tmp_path) -> dict[str, str]:
    """`.pth` files of the small test models with random reference weights, one per layout."""
    files = {}
    for layout, overrides in {
        "global_pool": {},
        "cls": {"global_pool": False},
        "encoder": {"num_classes": 0, "global_pool": False},
    }.items():
        timm_model = randomize_(
            references.timm_classifier(full_config("vit_test_patch4", **overrides)), seed=3
        )
        files[layout] = numpy_state_dict(timm_model)
    hf = randomize_(references.hf_mae(full_config("mae_vit_test_patch4")), seed=3)
    files["mae"] = pth_layout(hf, tmp_path / "hf_mae")
    for layout, state_dict in files.items():
        save_torch_checkpoint(tmp_path / f"{layout}.pth", state_dict)
    return {layout: str(tmp_path / f"{layout}.pth") for layout in files}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return small_checkpoints(tmp_path_factory.mktemp("parity"))


@pytest.mark.parametrize(
    "layout, flags, rows",
    [
        ("global_pool", [], ["max |logit diff|", "top-1 agreement"]),
        ("cls", ["--img_size", "48"], ["max |logit diff|", "top-1 agreement"]),
        ("encoder", [], ["max |feature diff|"]),
        ("mae", [], ["|loss diff| / |loss|", "max |pred diff|", "mask disagreements"]),
        ("mae", ["--norm_pix_loss"], ["|loss diff| / |loss|", "max |pred diff|", "mask disagreements"]),
    ],
)
def test_parity_command_agrees(checkpoints, capsys, layout, flags, rows):
    parity.main(["--checkpoint", checkpoints[layout], "--batch_size", "2", *flags])
    out = capsys.readouterr().out
    assert out.rstrip().endswith("parity OK")
    for row in rows:
        assert any(line.startswith(row) and line.endswith("yes") for line in out.splitlines()), row


@pytest.mark.parametrize("layout", ["cls", "mae"])
def test_parity_command_exits_1_when_the_reference_differs(checkpoints, capsys, monkeypatch, layout):
    """One bias entry off by 0.1 in the PyTorch copy is caught (exit status 1). (A shift of
    the whole bias would be invisible: the next LayerNorm removes it.)"""
    convert_back = references.flax_to_torch

    def nudged(*args, **kwargs):
        state_dict = convert_back(*args, **kwargs)
        state_dict["blocks.1.mlp.fc2.bias"] = state_dict["blocks.1.mlp.fc2.bias"].copy()
        state_dict["blocks.1.mlp.fc2.bias"][0] += 0.1
        return state_dict

    monkeypatch.setattr(references, "flax_to_torch", nudged)
    with pytest.raises(SystemExit) as exit_info:
        parity.main(["--checkpoint", checkpoints[layout], "--batch_size", "2"])
    assert exit_info.value.code == 1
    assert "parity FAILED" in capsys.readouterr().out


def test_parity_command_reads_the_eval_batch_of_data_path(checkpoints, capsys, monkeypatch):
    """`--data_path` images: the val split's first batch from `semmae_jax.data.eval_batches`
    at the model's size; padding examples (mask False) are left out."""
    calls = []

    def open_source(data_path, split):
        calls.append(("open_source", data_path, split))
        return "source"

    def eval_batches(source, *, process_batch, img_size):
        calls.append(("eval_batches", source, process_batch, img_size))
        rng = np.random.default_rng(5)
        yield {
            "image": rng.standard_normal((process_batch, img_size, img_size, 3), dtype=np.float32),
            "label": np.zeros(process_batch, np.int32),
            "mask": np.array([True, True, False]),
        }

    monkeypatch.setattr(semmae_jax.data, "open_source", open_source, raising=False)
    monkeypatch.setattr(semmae_jax.data, "eval_batches", eval_batches, raising=False)
    parity.main(["--checkpoint", checkpoints["global_pool"], "--data_path", "/data/imagenet", "--batch_size", "3"])
    assert calls == [("open_source", "/data/imagenet", "val"), ("eval_batches", "source", 3, 32)]
    out = capsys.readouterr().out
    assert "2 images of 32px from /data/imagenet" in out and out.rstrip().endswith("parity OK")


def test_parity_command_reports_both_accuracies_over_a_whole_image_folder(checkpoints, capsys, demo_root):
    """`--all_images`: every demo validation image through the project's eval transform, then
    JAX and timm on the same images: the same Acc@1 (the inputs are identical)."""
    parity.main(["--checkpoint", checkpoints["global_pool"], "--data_path", str(demo_root), "--batch_size", "32",
                 "--all_images"])
    out = capsys.readouterr().out
    assert "128 images of 32px" in out and out.rstrip().endswith("parity OK")
    acc = {line.split("  ")[0].strip(): float(line.split()[3]) for line in out.splitlines() if line.startswith("Acc@1")}
    assert acc["Acc@1 % JAX"] == acc["Acc@1 % PyTorch"]
