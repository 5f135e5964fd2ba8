"""Stage 1's frozen backbone: timm parity, and every checkpoint layout it is read from.

The layouts (DINO / iBOT releases and training files, MAE pretraining files and runs)
are written here with random weights of `vit_test_patch4`'s shape; the parity runs timm
on the same weights, as a DINO release would be run.
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import numpy as np
import pytest
import torch
from torch_helpers import randomize_

from convert import torch_to_flax
from convert.arch import Architecture, full_config
from convert.parity import references
from convert.reader.backbones import backbone_params, backbone_state_dict
from convert.safe_load import numpy_to_tensor
from convert.table import ConversionError
from semmae_jax import checkpoint
from semmae_jax.parts import backbone_features, backbone_model

ENCODER = Architecture("vit_test_patch4", {"num_classes": 0, "global_pool": False})
CLASSIFIER = Architecture("vit_test_patch4", {"global_pool": False})  # norm + head
MAE = Architecture("mae_vit_test_patch4")
ATOL = 1e-4


def random_state_dict(arch: Architecture, seed: int = 0) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict((k, rng.standard_normal(s).astype(np.float32)) for k, s in arch.torch_shapes().items())


def tensors(state_dict, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((prefix + k, numpy_to_tensor(v)) for k, v in state_dict.items())


def images(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((batch, 32, 32, 3), dtype=np.float32)


def features(path) -> tuple:
    params, name, overrides = backbone_params(path)
    with jax.default_matmul_precision("float32"):
        return jax.tree.map(np.asarray, backbone_features(backbone_model(name, overrides), params, images()))


def test_features_equal_timm_forward_features_for_dino_layout_weights(tmp_path):
    """cls + patch tokens after the final norm, and the last block's cls attention, as timm computes them."""
    reference = randomize_(references.timm_classifier(full_config("vit_test_patch4", **ENCODER.overrides)), 0)
    reference.blocks[-1].attn.fused_attn = False  # so that the attention weights pass through attn_drop
    captured = {}
    reference.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, inputs, out: captured.update(attn=out))
    torch.save({k: v.clone() for k, v in reference.state_dict().items()}, tmp_path / "dino_deitsmall.pth")
    with torch.no_grad():
        expected = reference.forward_features(torch.from_numpy(images().transpose(0, 3, 1, 2))).numpy()
    got = features(tmp_path / "dino_deitsmall.pth")
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(got.cls, expected[:, 0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.patches, expected[:, 1:], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.cls_attention, captured["attn"].numpy()[:, :, 0, 1:], rtol=0, atol=1e-5)


def training_file(teacher: OrderedDict, student: OrderedDict, student_extra: dict) -> dict:
    """A DINO / iBOT training checkpoint: a DDP student, a plain teacher, both with heads."""
    head = {"head.mlp.0.weight": torch.ones(4, 32), "head.last_layer.weight_g": torch.ones(1, 8)}
    student = {**tensors(student, "module.backbone."), **{"module." + k: v for k, v in head.items()},
               **{"module.backbone." + k: v for k, v in student_extra.items()}}
    return {"student": student, "teacher": {**tensors(teacher, "backbone."), **head}, "optimizer": {}, "epoch": 100}


@pytest.mark.parametrize("layout", ["dino release", "ibot release", "dino training", "ibot training"])
def test_self_supervised_layouts_give_the_teacher_backbone(tmp_path, layout):
    backbone, student = random_state_dict(ENCODER, 0), random_state_dict(ENCODER, 1)
    files = {
        "dino release": lambda: tensors(backbone),
        "ibot release": lambda: {"state_dict": tensors(backbone)},
        "dino training": lambda: training_file(backbone, student, {}),
        "ibot training": lambda: training_file(backbone, student, {"masked_embed": torch.zeros(1, 32)}),
    }
    torch.save(files[layout](), tmp_path / "ckpt.pth")
    state_dict = backbone_state_dict(tmp_path / "ckpt.pth")
    assert list(state_dict) == list(backbone)  # the teacher's, no head, no masked_embed
    for key, value in backbone.items():
        np.testing.assert_array_equal(state_dict[key], value)
    params, name, overrides = backbone_params(tmp_path / "ckpt.pth")
    assert Architecture(name, overrides) == ENCODER
    np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc2"]["kernel"], backbone["blocks.1.mlp.fc2.weight"].T)


def test_mae_pth_run_and_cls_classifier_give_their_encoder(tmp_path):
    """An MAE .pth, the same MAE as an orbax run, and a cls-token classifier: same encoder, nothing else."""
    mae = random_state_dict(MAE, 2)
    torch.save({"model": tensors(mae), "epoch": 3}, tmp_path / "mae.pth")
    from_pth, name, overrides = backbone_params(tmp_path / "mae.pth")
    checkpoint.save_params(tmp_path / "run", torch_to_flax(mae)[0])
    from_run, run_name, run_overrides = backbone_params(tmp_path / "run")
    assert run_name == "mae_vit_test_patch4" and sorted(from_run) == sorted(from_pth)
    assert "decoder_embed" not in from_run and "mask_token" not in from_run
    jax.tree.map(np.testing.assert_array_equal, from_run, from_pth)
    assert backbone_model(run_name, run_overrides) == backbone_model(name, overrides)

    classifier = random_state_dict(CLASSIFIER, 3)
    torch.save({"model": tensors(classifier)}, tmp_path / "cls.pth")
    assert "head.weight" not in backbone_state_dict(tmp_path / "cls.pth")


def test_global_pool_classifier_is_refused_with_the_reason(tmp_path):
    pooled = random_state_dict(Architecture("vit_test_patch4"), 4)  # fc_norm, no norm
    torch.save({"model": tensors(pooled)}, tmp_path / "finetuned.pth")
    with pytest.raises(ConversionError, match="global-pool classifier"):
        backbone_params(tmp_path / "finetuned.pth")


def test_img_size_resamples_the_position_table(tmp_path):
    torch.save(tensors(random_state_dict(ENCODER, 5)), tmp_path / "dino.pth")
    params, name, overrides = backbone_params(tmp_path / "dino.pth", img_size=48)
    model = backbone_model(name, overrides)
    assert (model.img_size, params["pos_embed"].shape) == (48, (1, 1 + 12 * 12, 32))
