"""The converter: safe loading, the key table both ways, architecture inference, the CLI.

Small registered models (`mae_vit_test_patch4`, `vit_test_patch4`) keep these fast; the
numerical parity against timm / transformers is in `test_parity.py`.
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from torch_helpers import assert_same_bits, payloads

import convert
from convert import cli
from convert.arch import Architecture, infer_architecture, key_mismatches
from convert.parity import references
from convert.safe_load import numpy_to_tensor, tensor_to_numpy
from convert.table import flatten, unflatten
from semmae_jax import checkpoint
from semmae_jax import cli as main_cli
from semmae_jax.models.pos_embed import interpolate_pos_embed

MAE = Architecture("mae_vit_test_patch4")
GLOBAL_POOL = Architecture("vit_test_patch4")
CLS = Architecture("vit_test_patch4", {"global_pool": False})
ENCODER = Architecture("vit_test_patch4", {"num_classes": 0, "global_pool": False})
LAYOUTS = {"mae": MAE, "global_pool": GLOBAL_POOL, "cls": CLS, "encoder": ENCODER}


def random_state_dict(arch: Architecture, seed: int = 0, dtype=np.float32) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict((k, rng.standard_normal(s).astype(dtype)) for k, s in arch.torch_shapes().items())


def random_params(arch: Architecture, seed: int = 0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return unflatten({p: rng.standard_normal(s).astype(dtype) for p, s in arch.flax_shapes().items()})


def tensors(state_dict) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, numpy_to_tensor(v)) for k, v in state_dict.items())


def mae_training_checkpoint(state_dict) -> dict:
    """A checkpoint as MAE's `misc.save_model` writes it, with a real AdamW state."""
    params = [torch.nn.Parameter(t.clone()) for t in tensors(state_dict).values()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    args = argparse.Namespace(
        model="mae_vit_test_patch4", batch_size=64, blr=1.5e-4, mask_ratio=0.75, norm_pix_loss=True
    )
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }
    return {
        "model": tensors(state_dict),
        "optimizer": optimizer.state_dict(),
        "epoch": 7,
        "scaler": scaler,
        "args": args,
    }


# --- safe loading ------------------------------------------------------------------------


def test_mae_training_checkpoint_loads_without_unsafe_pickle(tmp_path):
    state_dict = random_state_dict(MAE)
    torch.save(mae_training_checkpoint(state_dict), tmp_path / "ckpt.pth")
    loaded, info = convert.load_torch_checkpoint(tmp_path / "ckpt.pth")
    assert_same_bits(loaded, state_dict)
    assert info.wrapper == "model"
    assert set(info.other_entries) == {"optimizer", "epoch", "scaler", "args"}
    assert (info.epoch, info.args_model, info.trusted_pickle) == (7, "mae_vit_test_patch4", False)


def test_numpy_scalars_load_under_numpy_1_and_2_names(tmp_path):
    values = {"model": tensors(random_state_dict(GLOBAL_POOL)), "max_accuracy": np.float64(83.25), "step": np.int64(9)}
    torch.save(values, tmp_path / "np2.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "np2.pth").read_bytes()
    assert b"numpy._core.multiarray" in data
    (tmp_path / "np1.pth").write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    for name in ("np1.pth", "np2.pth"):
        loaded, info = convert.load_torch_checkpoint(tmp_path / name)
        assert set(info.other_entries) == {"max_accuracy", "step"}
        assert list(loaded) == list(values["model"])


@pytest.mark.parametrize("payload", ["os.system", "exec"])
@pytest.mark.parametrize("writer", ["torch.save", "legacy torch.save", "plain pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, writer):
    marker = tmp_path / "payload_ran"
    evil = {"args": payloads(marker)[payload], "model": tensors(random_state_dict(GLOBAL_POOL))}
    path = tmp_path / "evil.pth"
    if writer == "plain pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))  # the protocol torch.load reads
    else:
        torch.save(evil, path, _use_new_zipfile_serialization=writer == "torch.save")
    with pytest.raises(convert.ConversionError) as error:
        convert.load_torch_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "--trust-pickle" in message
    assert ("system" in message) if payload == "os.system" else ("exec" in message)
    assert not marker.exists()


def test_trust_pickle_runs_the_payload_after_a_warning(tmp_path, capsys):
    """The opt-in really unpickles (so the refusal above is what protects)."""
    marker = tmp_path / "payload_ran"
    torch.save({"model": payloads(marker)["os.system"]}, tmp_path / "evil.pth")
    with pytest.raises(convert.ConversionError, match=r"entry|not a checkpoint"):
        convert.load_torch_checkpoint(tmp_path / "evil.pth", trust_pickle=True)
    assert marker.exists()
    assert "WARNING" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated zip", "truncated legacy", "random bytes", "empty", "text"])
def test_unreadable_file_is_one_line_error_and_exit_1(tmp_path, capsys, damage):
    path = tmp_path / "bad.pth"
    good = tmp_path / "good.pth"
    torch.save({"model": tensors(random_state_dict(GLOBAL_POOL))}, good, _use_new_zipfile_serialization="zip" in damage)
    data = good.read_bytes()
    contents = {
        "truncated zip": data[: len(data) // 2],
        "truncated legacy": data[: len(data) // 2],
        "random bytes": np.random.default_rng(0).bytes(4096),
        "empty": b"",
        "text": b"not a checkpoint\n",
    }
    path.write_bytes(contents[damage])
    with pytest.raises(convert.ConversionError, match=f"^{path}: "):
        convert.load_torch_checkpoint(path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["to-flax", str(path), str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err


def test_ddp_prefix_is_stripped_and_reported(tmp_path):
    state_dict = random_state_dict(CLS)
    torch.save({"model": OrderedDict(("module." + k, v) for k, v in tensors(state_dict).items())}, tmp_path / "ddp.pth")
    loaded, info = convert.load_torch_checkpoint(tmp_path / "ddp.pth")
    assert_same_bits(loaded, state_dict)
    assert info.prefixes == ("module.",) and info.dropped == ()


def test_dino_teacher_backbone_becomes_an_encoder(tmp_path):
    """DINO training files: the teacher's `backbone.*` is the ViT; its projection head is dropped."""
    backbone = random_state_dict(ENCODER)
    teacher = OrderedDict(("backbone." + k, v) for k, v in tensors(backbone).items())
    teacher["head.last_layer.weight_g"] = torch.ones(1, 3)
    torch.save({"student": teacher, "teacher": teacher, "epoch": 100}, tmp_path / "dino.pth")
    loaded, info = convert.load_torch_checkpoint(tmp_path / "dino.pth")
    assert_same_bits(loaded, backbone)
    assert (info.wrapper, info.prefixes, info.dropped) == ("teacher", ("backbone.",), ("head.last_layer.weight_g",))
    _, name, overrides = convert.torch_to_flax(loaded)
    assert Architecture(name, overrides) == ENCODER


def test_bfloat16_travels_as_raw_bits(tmp_path):
    state_dict = random_state_dict(GLOBAL_POOL)
    bf16 = OrderedDict((k, torch.from_numpy(v).to(torch.bfloat16)) for k, v in state_dict.items())
    torch.save({"model": bf16}, tmp_path / "bf16.pth")
    loaded, _ = convert.load_torch_checkpoint(tmp_path / "bf16.pth")
    for key, tensor in bf16.items():
        assert loaded[key].dtype == ml_dtypes.bfloat16
        assert np.array_equal(loaded[key].view(np.int16), tensor.view(torch.int16).numpy())
        assert torch.equal(numpy_to_tensor(loaded[key]).view(torch.int16), tensor.view(torch.int16))
    params, name, _ = convert.torch_to_flax(loaded)
    assert {v.dtype for v in flatten(params).values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert_same_bits(convert.flax_to_torch(params, name), loaded)


# --- the key table both ways -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_flax_torch_is_bit_exact(layout, dtype):
    state_dict = random_state_dict(LAYOUTS[layout], dtype=dtype)
    params, name, overrides = convert.torch_to_flax(state_dict)
    assert Architecture(name, overrides) == LAYOUTS[layout]
    assert_same_bits(convert.flax_to_torch(params, name), state_dict)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flax_torch_flax_is_bit_exact(layout, dtype):
    arch = LAYOUTS[layout]
    params = random_params(arch, dtype=dtype)
    state_dict = convert.flax_to_torch(params, arch.name, model_overrides=arch.overrides)
    again, name, overrides = convert.torch_to_flax(state_dict, arch.name)
    assert (name, overrides) == (arch.name, arch.overrides)
    expected, got = flatten(params), flatten(again)
    assert_same_bits(got, {path: expected[path] for path in got})
    assert set(got) == set(expected)


def test_state_dict_order_is_the_originals():
    def top_level(keys):
        return list(dict.fromkeys(k.split(".")[0] for k in keys))

    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    block_keys = [f"blocks.0.{m}.{w}" for m in block for w in ("weight", "bias")]
    orders = {
        "mae": ["cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed", "blocks", "norm",
                "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred"],
        "global_pool": ["cls_token", "pos_embed", "patch_embed", "blocks", "head", "fc_norm"],
        "cls": ["cls_token", "pos_embed", "patch_embed", "blocks", "norm", "head"],
        "encoder": ["cls_token", "pos_embed", "patch_embed", "blocks", "norm"],
    }  # fmt: skip
    for layout, arch in LAYOUTS.items():
        keys = list(convert.flax_to_torch(random_params(arch), arch.name, model_overrides=arch.overrides))
        assert top_level(keys) == orders[layout], layout
        assert [k for k in keys if k.startswith("blocks.0.")] == block_keys
        assert keys.index("blocks.1.norm1.weight") > keys.index("blocks.0.mlp.fc2.bias")


@pytest.mark.parametrize("layout", ["global_pool", "cls", "encoder"])
def test_timm_loads_the_converted_state_dict_strictly(layout):
    arch = LAYOUTS[layout]
    state_dict = convert.flax_to_torch(random_params(arch), arch.name, model_overrides=arch.overrides)
    model = references.timm_classifier(arch.config)
    model.load_state_dict(tensors(state_dict), strict=True)
    loaded = model.state_dict()  # timm 1.x lists fc_norm before head: compare by key
    assert_same_bits(OrderedDict((k, tensor_to_numpy(loaded[k])) for k in state_dict), state_dict)


# --- mismatches --------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", [None, "vit_test_patch4"])
def test_wrong_shape_names_key_both_shapes_and_model(model_name):
    state_dict = random_state_dict(GLOBAL_POOL)
    state_dict["blocks.1.mlp.fc1.weight"] = np.zeros((100, 32), np.float32)
    with pytest.raises(convert.ConversionError) as error:
        convert.torch_to_flax(state_dict, model_name)
    message = str(error.value)
    assert "blocks.1.mlp.fc1.weight: checkpoint (100, 32) vs model (128, 32)" in message
    assert "vit_test_patch4" in message


def test_missing_and_unexpected_keys_reported_together():
    state_dict = random_state_dict(CLS)
    del state_dict["blocks.0.norm2.bias"]
    state_dict["blocks.0.attn.q_bias"] = np.zeros(32, np.float32)
    assert key_mismatches(state_dict, CLS.torch_shapes()) == (["blocks.0.norm2.bias"], ["blocks.0.attn.q_bias"])
    with pytest.raises(
        convert.ConversionError, match=r"missing keys \[blocks.0.norm2.bias\]; unexpected keys \[blocks.0.attn.q_bias\]"
    ):
        convert.torch_to_flax(state_dict)


def test_wrong_family_and_non_vit_files_are_clear_errors():
    with pytest.raises(convert.ConversionError, match="MAE pretraining model"):
        convert.torch_to_flax(random_state_dict(GLOBAL_POOL), "mae_vit_test_patch4")
    with pytest.raises(convert.ConversionError, match="not a ViT / MAE state dict"):
        convert.torch_to_flax({"conv1.weight": np.zeros((8, 3, 7, 7), np.float32)})


# --- architecture inference --------------------------------------------------------------


@pytest.mark.parametrize(
    "arch",
    [
        Architecture("mae_vit_base_patch8"),
        Architecture("mae_vit_huge_patch14"),
        Architecture("vit_large_patch16", {"num_classes": 100, "global_pool": False, "img_size": 384}),
        Architecture("vit_base_patch16", {"num_classes": 0, "global_pool": False}),
    ],
    ids=str,
)
def test_registered_architectures_are_recognised(arch):
    assert infer_architecture(arch.torch_shapes()) == arch


def test_unregistered_shapes_use_the_head_dim_rule(caplog):
    custom = Architecture("mae_vit_base_patch16").with_overrides(
        img_size=48, patch_size=8, embed_dim=128, depth=3, decoder_embed_dim=64, decoder_depth=2
    )
    with caplog.at_level("INFO", logger="convert"):
        inferred = infer_architecture(custom.with_overrides(num_heads=2, decoder_num_heads=2).torch_shapes())
    assert inferred == custom.with_overrides(num_heads=2, decoder_num_heads=2)
    assert "head_dim rule" in caplog.text


def test_inconsistent_args_model_hint_is_ignored(caplog):
    with caplog.at_level("INFO", logger="convert"):
        assert infer_architecture(MAE.torch_shapes(), hint="mae_vit_base_patch16") == MAE
    assert "does not match" in caplog.text


# --- position tables ---------------------------------------------------------------------


@pytest.mark.parametrize("new_grid", [5, 12])
def test_interpolate_pos_embed_matches_torch(new_grid):
    """The original's `interpolate_pos_embed`: F.interpolate bicubic, align_corners=False, cls kept."""
    table = np.random.default_rng(0).standard_normal((1, 1 + 8 * 8, 16)).astype(np.float32)
    grid = torch.from_numpy(table[:, 1:]).reshape(1, 8, 8, 16).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    expected = np.concatenate([table[:, :1], resized.permute(0, 2, 3, 1).flatten(1, 2).numpy()], axis=1)
    np.testing.assert_allclose(interpolate_pos_embed(table, new_grid), expected, atol=1e-5)


def test_img_size_resamples_both_tables():
    state_dict = random_state_dict(MAE)
    params, _, overrides = convert.torch_to_flax(state_dict, img_size=48)
    assert overrides == {"img_size": 48}
    for table in ("pos_embed", "decoder_pos_embed"):
        np.testing.assert_array_equal(params[table], interpolate_pos_embed(state_dict[table], 12))
    assert_same_bits(
        flatten(convert.torch_to_flax(state_dict, img_size=32)[0]), flatten(convert.torch_to_flax(state_dict)[0])
    )
    with pytest.raises(convert.ConversionError, match="not a multiple of the patch size"):
        convert.torch_to_flax(state_dict, img_size=50)


def test_interpolate_pos_embed_of_a_non_square_grid_matches_torch():
    """Rows and columns each by their own factor, from a 6x10 grid to 8x12 (F.interpolate(size=(8, 12)))."""
    table = np.random.default_rng(1).standard_normal((1, 1 + 6 * 10, 16)).astype(np.float32)
    grid = torch.from_numpy(table[:, 1:]).reshape(1, 6, 10, 16).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(8, 12), mode="bicubic", align_corners=False)
    expected = np.concatenate([table[:, :1], resized.permute(0, 2, 3, 1).flatten(1, 2).numpy()], axis=1)
    np.testing.assert_allclose(interpolate_pos_embed(table, (8, 12), old_grid=(6, 10)), expected, atol=1e-5)


NON_SQUARE = Architecture("mae_vit_test_patch4", {"img_size": (24, 40)})


def test_a_non_square_table_is_read_at_the_size_given_and_otherwise_named_in_one_line(tmp_path, capsys):
    """A table's shape cannot say 6x10 from 10x6: a file without a config needs `--img_size H W`;
    a square grid is resampled to it as before."""
    state_dict = random_state_dict(NON_SQUARE)
    with pytest.raises(convert.ConversionError, match=r"holds 60 positions, not a square grid: give the image size "
                                                      r"it was made for \(--img_size HEIGHT WIDTH\)"):
        convert.torch_to_flax(state_dict)
    params, name, overrides = convert.torch_to_flax(state_dict, img_size=(24, 40))
    assert (name, overrides) == ("mae_vit_test_patch4", {"img_size": (24, 40)})
    assert_same_bits(convert.flax_to_torch(params, name, model_overrides=overrides), state_dict)
    square = convert.torch_to_flax(random_state_dict(MAE), img_size=(24, 40))  # 8x8 -> 6x10, resampled
    assert square[2] == {"img_size": (24, 40)} and square[0]["pos_embed"].shape == (1, 61, 32)
    torch.save({"model": tensors(state_dict)}, tmp_path / "in.pth")
    cli.main(["to-flax", str(tmp_path / "in.pth"), str(tmp_path / "orbax"), "--img_size", "24", "40"])
    _, meta = checkpoint.load_params(tmp_path / "orbax")
    assert meta["model_overrides"] == {"img_size": [24, 40]}
    cli.main(["to-torch", str(tmp_path / "orbax"), str(tmp_path / "out.pth")])  # the saved size, no flag
    saved = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert_same_bits(OrderedDict((k, tensor_to_numpy(v)) for k, v in saved.items()), state_dict)


# --- files and the command line ----------------------------------------------------------


def test_cli_round_trip_of_an_mae_training_checkpoint(tmp_path):
    state_dict = random_state_dict(MAE)
    torch.save(mae_training_checkpoint(state_dict), tmp_path / "in.pth")
    cli.main(["to-flax", str(tmp_path / "in.pth"), str(tmp_path / "orbax")])
    _, meta = checkpoint.load_params(tmp_path / "orbax")
    assert meta == {"model": "mae_vit_test_patch4", "model_overrides": {}, "source": str(tmp_path / "in.pth")}
    main_cli.main(["convert", "to-torch", str(tmp_path / "orbax"), str(tmp_path / "out.pth")])
    saved = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(saved) == ["model"]
    assert_same_bits(OrderedDict((k, tensor_to_numpy(v)) for k, v in saved["model"].items()), state_dict)


def test_cli_model_and_img_size_flags(tmp_path):
    torch.save({"model": tensors(random_state_dict(CLS))}, tmp_path / "in.pth")
    cli.main(
        ["to-flax", str(tmp_path / "in.pth"), str(tmp_path / "orbax"), "--model", "vit_test_patch4", "--img_size", "48"]
    )
    params, meta = checkpoint.load_params(tmp_path / "orbax")
    assert (meta["model"], meta["model_overrides"]) == ("vit_test_patch4", {"img_size": 48, "global_pool": False})
    assert params["pos_embed"].shape == (1, 1 + 12 * 12, 32)
    cli.main(["to-torch", str(tmp_path / "orbax"), str(tmp_path / "out.pth"), "--model", "vit_test_patch4"])
    assert torch.load(tmp_path / "out.pth", weights_only=True)["model"]["pos_embed"].shape == (1, 145, 32)


def test_params_from_checkpoint_reads_pth_and_orbax_alike(tmp_path):
    torch.save({"model": tensors(random_state_dict(MAE))}, tmp_path / "in.pth")
    from_pth = convert.params_from_checkpoint(tmp_path / "in.pth", img_size=48)
    checkpoint.save_params(tmp_path / "orbax", convert.params_from_checkpoint(tmp_path / "in.pth")[0])
    from_orbax = convert.params_from_checkpoint(tmp_path / "orbax", img_size=48)  # no meta: inferred
    assert from_pth[1:] == from_orbax[1:] == ("mae_vit_test_patch4", {"img_size": 48})
    assert_same_bits(dict(sorted(flatten(from_orbax[0]).items())), dict(sorted(flatten(from_pth[0]).items())))
    with pytest.raises(convert.ConversionError, match=f"^{tmp_path / 'orbax'}: .*vit_test_patch4"):
        convert.params_from_checkpoint(tmp_path / "orbax", "vit_test_patch4")


def test_written_pth_is_a_plain_zip_torch_file(tmp_path):
    convert.save_torch_checkpoint(tmp_path / "sub" / "x.pth", random_state_dict(CLS))
    assert zipfile.is_zipfile(tmp_path / "sub" / "x.pth")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "sub" / "x.pth") == []


def test_python_m_convert_help():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "convert", "--help"], capture_output=True, text=True, cwd=root, check=False, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "to-flax" in result.stdout and "to-torch" in result.stdout
