"""transformers checkpoints both ways, checked against transformers itself.

Every directory here is written by transformers' own `save_pretrained` (5.24: the decoder's
blocks as `decoder.decoder_encoder.layer.N`; `hub_layout` renames them as transformers 4
wrote them and the hub ships them) from a tiny model of the test models' shapes with
random weights of a real scale (perturbed LayerNorm scales and biases, random tables).
"""

from __future__ import annotations

import json
import re
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from torch_helpers import HF_CLASSES, assert_same_bits, images, jax_apply, masking_noise, nchw, payloads, tiny_hf

import convert
from convert import cli
from convert.arch import full_config
from convert.parity import forward as parity
from convert.parity import references
from convert.reader.backbones import backbone_params
from convert.table import flatten
from semmae_jax import checkpoint
from semmae_jax import cli as main_cli
from semmae_jax.models import create_model

ATOL = 1e-4
T5_DECODER, HUB_DECODER = "decoder.decoder_encoder.layer.", "decoder.decoder_layers."


def hub_layout(directory) -> None:
    """Rename a transformers-5 directory's decoder blocks as the hub's (transformers 4) files hold them."""
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    safetensors.numpy.save_file({k.replace(T5_DECODER, HUB_DECODER): v for k, v in tensors.items()}, path,
                                metadata={"format": "pt"})  # fmt: skip


def assert_same_params(a, b) -> None:
    """Two params trees with the same paths and the same bits at each (in any order)."""
    assert_same_bits(dict(sorted(flatten(a).items())), dict(sorted(flatten(b).items())))


def shrink_embeddings(module: torch.nn.Module) -> torch.nn.Module:
    """Embeddings x 1e-4: the first LayerNorm then sees a variance of ~1e-9, where eps 1e-6 and
    1e-12 give visibly different outputs (random weights of unit scale hide eps)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".embeddings." in f".{name}":
                param.mul_(1e-4)
    return module


def jax_and_transformers(hf_class: str, model, params, reference, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """The same output of both: MAE's pred (masks asserted equal), logits, or every encoder token."""
    x = images(config)
    with torch.no_grad():
        if hf_class == "ViTMAEForPreTraining":
            noise = masking_noise(config)
            _, pred, mask = jax_apply(model, params, x, mask_ratio=reference.config.mask_ratio, noise=noise)
            out = reference(nchw(x), noise=torch.from_numpy(noise))
            np.testing.assert_array_equal(mask, out.mask.numpy())
            return pred, out.logits.numpy()
        if hf_class == "ViTForImageClassification":
            return jax_apply(model, params, x), reference(nchw(x)).logits.numpy()
        reference.config.mask_ratio = 0.0  # ViTMAEModel masks: keep every patch, in order
        noise = {"noise": torch.arange(masking_noise(config).shape[1], dtype=torch.float32).expand(len(x), -1)}
        out = reference(nchw(x), **(noise if hf_class == "ViTMAEModel" else {}))
        tokens, expected = jax_apply(model, params, x, method=model.tokens), out.last_hidden_state.numpy()
        if hf_class == "ViTModel":  # and its pooler: dense + tanh on the cls token
            return (np.concatenate([tokens.reshape(len(x), -1), jax_apply(model, params, x)], axis=1),
                    np.concatenate([expected.reshape(len(x), -1), out.pooler_output.numpy()], axis=1))
        return tokens, expected


@pytest.mark.parametrize("eps", [1e-12, 1e-6])
@pytest.mark.parametrize("hf_class", HF_CLASSES)
def test_directory_runs_in_jax_as_in_transformers(tmp_path, caplog, hf_class, eps):
    reference = shrink_embeddings(tiny_hf(hf_class, layer_norm_eps=eps))
    reference.save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="convert"):
        params, name, overrides, _ = convert.read_checkpoint(tmp_path)
    assert f"transformers {hf_class}, eps {eps:g}" in caplog.text
    config = full_config(name, **overrides)
    assert config["layer_norm_eps"] == eps
    got, expected = jax_and_transformers(hf_class, create_model(name, **overrides), params, reference, config)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    other_eps = create_model(name, **{**overrides, "layer_norm_eps": 1e-6 if eps == 1e-12 else 1e-12})
    wrong, _ = jax_and_transformers(hf_class, other_eps, params, reference, config)
    assert np.abs(wrong - expected).max() > 100 * ATOL


@pytest.mark.parametrize("hf_class", HF_CLASSES)
def test_qkv_bias_false_runs_in_jax_as_in_transformers(tmp_path, caplog, hf_class):
    """`qkv_bias: false` (q, k, v without biases): read from the tensors, checked against the config."""
    reference = tiny_hf(hf_class, qkv_bias=False)
    reference.save_pretrained(tmp_path)
    with caplog.at_level("INFO", logger="convert"):
        params, name, overrides, _ = convert.read_checkpoint(tmp_path)
    assert "qkv_bias False" in caplog.text and overrides["qkv_bias"] is False
    assert "bias" not in params["blocks_0"]["attn"]["qkv"]
    config = full_config(name, **overrides)
    got, expected = jax_and_transformers(hf_class, create_model(name, **overrides), params, reference, config)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


ROUND_TRIPS = {
    "ViTMAEForPreTraining": dict(norm_pix_loss=True, mask_ratio=0.6),
    "ViTMAEModel": {},
    "ViTModel": {},
    "ViTForImageClassification": dict(id2label={str(i): f"class {i}" for i in range(10)}),
}


@pytest.mark.parametrize(
    "hf_class, layout, dtype, qkv_bias",
    [*((c, "hub", torch.float32, True) for c in HF_CLASSES), ("ViTMAEForPreTraining", "transformers 5", torch.float32, True),
     ("ViTMAEForPreTraining", "hub", torch.bfloat16, True), ("ViTMAEForPreTraining", "hub", torch.float32, False),
     ("ViTModel", "hub", torch.float32, False)],
)  # fmt: skip
def test_directory_to_flax_to_directory_is_bit_exact(tmp_path, hf_class, layout, dtype, qkv_bias):
    """Every tensor (the sin-cos tables, mask_token and ViTModel's pooler included) and the config
    fields come back, as the same class; transformers loads the result cleanly and computes the
    same outputs."""
    reference = tiny_hf(hf_class, layer_norm_eps=1e-12, qkv_bias=qkv_bias, **ROUND_TRIPS[hf_class]).to(dtype)
    reference.save_pretrained(tmp_path / "in")
    if layout == "hub":
        hub_layout(tmp_path / "in")
    cli.main(["to-flax", str(tmp_path / "in"), str(tmp_path / "flax")])
    main_cli.main(["convert", "to-hf", str(tmp_path / "flax"), str(tmp_path / "out")])

    original = safetensors.numpy.load_file(tmp_path / "in" / "model.safetensors")
    expected = {k.replace(T5_DECODER, HUB_DECODER): v for k, v in original.items()}
    written = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    assert_same_bits(dict(sorted(written.items())), dict(sorted(expected.items())))
    config_in, config_out = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("in", "out"))
    fields = ["architectures", "model_type", "layer_norm_eps", "hidden_act", "qkv_bias", "norm_pix_loss", "mask_ratio",
              "image_size", "patch_size", "num_attention_heads", "decoder_num_attention_heads"]  # fmt: skip
    if hf_class != "ViTModel":  # an encoder's labels mean nothing (and ViTMAEModel's config has none)
        fields += ["id2label", "label2id"]
    for field in fields:
        assert config_out.get(field) == config_in.get(field), field

    out_class = hf_class
    loaded = references.hf_pretrained(tmp_path / "out", out_class).to(dtype)  # refuses missing/unexpected/mismatched
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    noise = torch.arange(64, dtype=torch.float32).flip(0).expand(2, -1)
    with torch.no_grad():
        if out_class == "ViTMAEModel":  # it masks: keep every patch, in order
            loaded.config.mask_ratio = reference.config.mask_ratio = 0.0
            got, want = loaded(x, noise=noise.flip(1)), reference(x, noise=noise.flip(1))
        elif out_class == "ViTMAEForPreTraining":
            got, want = loaded(x, noise=noise), reference(x, noise=noise)
        else:
            got, want = loaded(x), reference(x)
    names = ["logits"] if hasattr(want, "logits") else ["last_hidden_state"] + (["pooler_output"] * (hf_class == "ViTModel"))
    for name in names:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-5)


def test_to_flax_keeps_mask_ratio_and_id2label_in_the_meta(tmp_path):
    labels = {str(i): f"class {i}" for i in range(10)}
    tiny_hf("ViTForImageClassification", id2label=labels).save_pretrained(tmp_path / "cls")
    tiny_hf("ViTMAEForPreTraining", mask_ratio=0.6, norm_pix_loss=True).save_pretrained(tmp_path / "mae")
    for name in ("cls", "mae"):
        cli.main(["to-flax", str(tmp_path / name), str(tmp_path / f"{name}_flax")])
    _, cls_meta = checkpoint.load_params(tmp_path / "cls_flax")
    _, mae_meta = checkpoint.load_params(tmp_path / "mae_flax")
    assert cls_meta["id2label"] == labels and cls_meta["transformers"]["class"] == "ViTForImageClassification"
    assert (cls_meta["model"], cls_meta["model_overrides"]) == ("vit_test_patch4", {"global_pool": False,
                                                                                   "layer_norm_eps": 1e-12})
    assert mae_meta["mask_ratio"] == 0.6
    assert mae_meta["model_overrides"] == {"norm_pix_loss": True, "layer_norm_eps": 1e-12}


def test_sharded_index_reads_as_the_single_file(tmp_path):
    reference = tiny_hf("ViTMAEForPreTraining")
    reference.save_pretrained(tmp_path / "one")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file() and len(shards) > 1
    one, sharded = convert.read_checkpoint(tmp_path / "one"), convert.read_checkpoint(tmp_path / "sharded")
    assert one[1:] == sharded[1:]
    assert_same_params(sharded.params, one.params)
    shards[-1].unlink()
    with pytest.raises(convert.ConversionError, match=f"index.json: shard {shards[-1].name} is missing"):
        convert.read_checkpoint(tmp_path / "sharded")


def test_lone_safetensors_in_either_layout(tmp_path):
    """transformers' layout without its config (eps: transformers' default), and the timm layout
    that `to-torch --format safetensors` writes; both read back to the same params."""
    tiny_hf("ViTForImageClassification").save_pretrained(tmp_path / "dir")
    shutil.copy(tmp_path / "dir" / "model.safetensors", tmp_path / "hub.safetensors")
    from_dir, lone = convert.read_checkpoint(tmp_path / "dir"), convert.read_checkpoint(tmp_path / "hub.safetensors")
    assert lone[1:3] == ("vit_test_patch4", {"global_pool": False, "layer_norm_eps": 1e-12}) == from_dir[1:3]
    assert_same_params(lone.params, from_dir.params)

    cli.main(["to-torch", str(tmp_path / "dir"), str(tmp_path / "timm.safetensors"), "--format", "safetensors"])
    timm_layout = safetensors.numpy.load_file(tmp_path / "timm.safetensors")
    assert_same_bits(dict(sorted(timm_layout.items())),
                     dict(sorted(convert.flax_to_torch(from_dir.params, "vit_test_patch4",
                                                       model_overrides=from_dir.overrides).items())))  # fmt: skip
    model = references.timm_classifier(full_config("vit_test_patch4", global_pool=False))
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "timm.safetensors"), strict=True)
    again = convert.read_checkpoint(tmp_path / "timm.safetensors")
    assert again[1:3] == ("vit_test_patch4", {"global_pool": False})  # the timm layout carries no eps
    assert_same_params(again.params, from_dir.params)


def test_pytorch_model_bin_goes_through_the_safe_loader(tmp_path):
    tiny_hf("ViTForImageClassification").save_pretrained(tmp_path / "st")
    tensors = safetensors.torch.load_file(tmp_path / "st" / "model.safetensors")
    for name, extra in (("bin", {}), ("evil", {"args": payloads(tmp_path / "payload_ran")["os.system"]})):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "st" / "config.json", tmp_path / name)
        torch.save({**tensors, **extra}, tmp_path / name / "pytorch_model.bin")
    from_bin, from_st = convert.read_checkpoint(tmp_path / "bin"), convert.read_checkpoint(tmp_path / "st")
    assert from_bin[1:] == from_st[1:]
    assert_same_params(from_bin.params, from_st.params)
    with pytest.raises(convert.ConversionError, match=r"pytorch_model\.bin: refused to unpickle .*--trust-pickle"):
        convert.read_checkpoint(tmp_path / "evil")
    assert not (tmp_path / "payload_ran").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"hidden_act": "relu"}, "hidden_act 'relu' is not implemented by the JAX models"),
        ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' is not implemented by the JAX models"),
        ({"qkv_bias": False}, "config.json says qkv_bias False, the tensors hold True"),
        ({"image_size": 64}, "config.json says image_size 64, the tensors hold 32"),
        ({"model_type": "deit"}, "model_type 'deit' is not a ViT or ViT-MAE"),
        ({"architectures": ["ViTForImageClassification"]}, "names ViTForImageClassification, but the weights are a ViTMAEForPreTraining's"),
    ],
)  # fmt: skip
def test_config_the_models_cannot_follow_is_one_line_error_and_exit_1(tmp_path, capsys, edit, message):
    tiny_hf("ViTMAEForPreTraining").save_pretrained(tmp_path / "in")
    config = json.loads((tmp_path / "in" / "config.json").read_text())
    (tmp_path / "in" / "config.json").write_text(json.dumps({**config, **edit}))
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["to-flax", str(tmp_path / "in"), str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'in'}") and message in err and "\n" not in err


def test_to_hf_refuses_a_global_pool_classifier_and_points_to_to_torch(tmp_path, capsys):
    params = create_model("vit_test_patch4").init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    checkpoint.save_params(tmp_path / "gp", nn.meta.unbox(params), meta={"model": "vit_test_patch4"})
    with pytest.raises(SystemExit):
        cli.main(["to-hf", str(tmp_path / "gp"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "global-pool classifier" in err and "cannot express" in err and "to-torch" in err
    assert not (tmp_path / "out").exists()


def test_a_non_square_4_band_classifier_runs_as_in_transformers_and_goes_back_bit_exact(tmp_path):
    """`image_size: [24, 40]` in config.json gives the table's grid, `num_channels: 4` the bands: the
    same logits, and to-hf writes the same tensors and config back."""
    reference = tiny_hf("ViTForImageClassification", image_size=[24, 40], num_channels=4)
    reference.save_pretrained(tmp_path / "in")
    params, name, overrides, _ = convert.read_checkpoint(tmp_path / "in")
    assert overrides["img_size"] == (24, 40) and overrides["in_chans"] == 4
    config = full_config(name, **overrides)
    got, expected = jax_and_transformers("ViTForImageClassification", create_model(name, **overrides), params,
                                         reference, config)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    cli.main(["to-flax", str(tmp_path / "in"), str(tmp_path / "orbax")])
    cli.main(["to-hf", str(tmp_path / "orbax"), str(tmp_path / "out")])
    written_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written_config["image_size"], written_config["num_channels"]) == ([24, 40], 4)
    written = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    original = safetensors.numpy.load_file(tmp_path / "in" / "model.safetensors")
    assert_same_bits(dict(sorted(written.items())), dict(sorted(original.items())))


@pytest.mark.parametrize("hf_class", ["ViTMAEForPreTraining", "ViTModel"])
def test_a_4_band_mae_or_encoder_runs_as_in_transformers(tmp_path, hf_class):
    reference = tiny_hf(hf_class, num_channels=4)
    reference.save_pretrained(tmp_path)
    params, name, overrides, _ = convert.read_checkpoint(tmp_path)
    assert overrides["in_chans"] == 4
    config = full_config(name, **overrides)
    got, expected = jax_and_transformers(hf_class, create_model(name, **overrides), params, reference, config)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_to_hf_refuses_a_non_square_mae_and_says_why(tmp_path, capsys):
    params = create_model("mae_vit_test_patch4", img_size=(24, 40)).init(
        {"params": jax.random.key(0), "mask": jax.random.key(1)}, np.zeros((1, 24, 40, 3), np.float32))["params"]
    checkpoint.save_params(tmp_path / "mae", nn.meta.unbox(params),
                           meta={"model": "mae_vit_test_patch4", "model_overrides": {"img_size": [24, 40]}})
    with pytest.raises(SystemExit):
        cli.main(["to-hf", str(tmp_path / "mae"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "a 24x40 MAE cannot be written for transformers" in err and "builds the sin-cos position table square" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["mae_vit_test_patch4", "vit_test_patch4"])
def test_flax_to_torch_takes_params_straight_from_init(name):
    boxed = create_model(name).init(
        {"params": jax.random.key(0), "mask": jax.random.key(1)}, np.zeros((1, 32, 32, 3), np.float32)
    )["params"]
    assert isinstance(boxed["pos_embed"], nn.Partitioned)
    state_dict = convert.flax_to_torch(boxed, name)
    again, _, _ = convert.torch_to_flax(state_dict, name)
    assert_same_params(again, nn.meta.unbox(boxed))


@pytest.mark.parametrize(
    "tree, message",
    [([1, 2], "got a list"), ({"blocks_0": {"attn": "kernel"}}, "'blocks_0/attn' is a str, not an array")],
)
def test_flax_to_torch_names_what_is_not_a_params_tree(tree, message):
    with pytest.raises(convert.ConversionError, match=message):
        convert.flax_to_torch(tree, "vit_test_patch4")


PARITY_CONFIGS = {"ViTMAEForPreTraining": dict(mask_ratio=0.5, norm_pix_loss=True)}


@pytest.mark.parametrize("hf_class", HF_CLASSES)
def test_parity_command_runs_transformers_own_class(tmp_path, capsys, hf_class):
    """The directory's own class against JAX; for MAE the config's mask_ratio and norm_pix_loss
    (not the defaults) are what both sides must use for the masks and the loss to agree."""
    tiny_hf(hf_class, **PARITY_CONFIGS.get(hf_class, {})).save_pretrained(tmp_path)
    parity.main(["--checkpoint", str(tmp_path), "--batch_size", "2"])
    out = capsys.readouterr().out
    assert f"reference: transformers {hf_class}" in out and out.rstrip().endswith("parity OK")
    if hf_class == "ViTMAEForPreTraining":
        assert next(line for line in out.splitlines() if line.startswith("masked fraction")).split()[2] == "0.5"


@pytest.mark.parametrize("hf_class", ["ViTMAEForPreTraining", "ViTForImageClassification"])
def test_parity_command_on_a_directory_exits_1_when_transformers_differs(tmp_path, capsys, monkeypatch, hf_class):
    tiny_hf(hf_class).save_pretrained(tmp_path)
    load = parity.references.hf_pretrained

    def nudged(directory, cls):
        model = load(directory, cls)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "fc2.bias" in n)[0] += 0.1
        return model

    monkeypatch.setattr(parity.references, "hf_pretrained", nudged)
    with pytest.raises(SystemExit) as exit_info:
        parity.main(["--checkpoint", str(tmp_path), "--batch_size", "2"])
    assert exit_info.value.code == 1 and "parity FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["directory", "lone file"])
def test_backbone_params_read_a_transformers_mae(tmp_path, source):
    tiny_hf("ViTMAEForPreTraining").save_pretrained(tmp_path / "mae")
    path = tmp_path / "mae" if source == "directory" else tmp_path / "mae" / "model.safetensors"
    params, name, overrides = backbone_params(path)
    full = convert.read_checkpoint(tmp_path / "mae")
    assert set(params) == {"cls_token", "pos_embed", "patch_embed", "blocks_0", "blocks_1", "norm"}
    assert_same_bits(flatten(params), {k: v for k, v in flatten(full.params).items() if k in flatten(params)})
    assert full_config(name, **overrides)["layer_norm_eps"] == 1e-12


# --------------------------------------------------------------- hub directories in the jobs
DEMO_CLASSES = ("blob", "hound", "lizard", "stork")  # the demo data's class folders, in label order
EVAL = ["--model", "vit_test_patch4", "--input_size", "32", "--nb_classes", "4", "--cls_token", "--batch_size", "8"]


def hub_classifier(directory, labels) -> None:
    """A `save_pretrained` ViTForImageClassification of the demo's 4 classes: eps 1e-12, q, k, v
    without biases, confident logits, `labels` as its id2label."""
    reference = tiny_hf("ViTForImageClassification", layer_norm_eps=1e-12, qkv_bias=False, num_labels=4,
                        id2label=dict(enumerate(labels)))  # fmt: skip
    with torch.no_grad():
        reference.classifier.weight.mul_(20.0)
    reference.save_pretrained(directory)


def test_eval_of_a_hub_classifier_runs_its_config_and_names_its_classes(tmp_path, demo_root, capsys):
    """`eval --resume HF_DIR` builds the model the config states (eps 1e-12, no q, k, v biases: without
    them the params would not fit), scores what transformers scores on the same images, and reports
    per class under the checkpoint's names."""
    hub_classifier(tmp_path / "hub", DEMO_CLASSES)
    main_cli.main(["eval", *EVAL, "--resume", str(tmp_path / "hub"), "--data_path", str(demo_root),
                   "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    out = capsys.readouterr().out
    assert "model fields stated by" in out and "'layer_norm_eps': 1e-12" in out and "'qkv_bias': False" in out
    acc1 = float(next(line for line in out.splitlines() if line.startswith("* Acc@1")).split()[2])
    per_class = json.loads((tmp_path / "eval" / "per_class_accuracy.json").read_text())
    assert [v["name"] for v in per_class.values()] == list(DEMO_CLASSES)
    for entry in per_class.values():
        assert re.search(rf"^  {entry['name']} +{entry['acc1']:.1f}%  \({entry['images']} images\)$", out, re.M)

    parity.main(["--checkpoint", str(tmp_path / "hub"), "--data_path", str(demo_root), "--all_images",
                 "--batch_size", "8"])  # fmt: skip
    rows = capsys.readouterr().out
    assert "reference: transformers ViTForImageClassification" in rows
    assert acc1 == pytest.approx(float(next(r for r in rows.splitlines() if r.startswith("Acc@1 % PyTorch")).split()[3]),
                                 abs=1e-3)  # fmt: skip


def test_eval_refuses_a_hub_classifier_whose_labels_order_the_classes_otherwise(tmp_path, demo_root):
    hub_classifier(tmp_path / "hub", DEMO_CLASSES[::-1])
    with pytest.raises(SystemExit, match=r"hub: its id2label orders the dataset's classes differently \(label 0 is "
                                         r"'stork' in the checkpoint, 'blob' in the dataset's class folders\)"):
        main_cli.main(["eval", *EVAL, "--resume", str(tmp_path / "hub"), "--data_path", str(demo_root),
                       "--output_dir", str(tmp_path / "eval")])  # fmt: skip


def test_finetune_from_a_hub_mae_directory_starts_from_its_encoder(tmp_path, demo_root):
    """`finetune --finetune HF_DIR`: one step at learning rate 0 (the first warm-up step) leaves the
    encoder exactly as transformers saved it; the head starts from its own init."""
    tiny_hf("ViTMAEForPreTraining").save_pretrained(tmp_path / "hub")
    main_cli.main(["finetune", "--model", "vit_test_patch4", "--input_size", "32", "--nb_classes", "4",
                   "--finetune", str(tmp_path / "hub"), "--data_path", str(demo_root), "--batch_size", "8",
                   "--epochs", "1", "--warmup_epochs", "1", "--steps_per_epoch", "1", "--num_workers", "2",
                   "--output_dir", str(tmp_path / "run")])  # fmt: skip
    hub = flatten(convert.read_checkpoint(tmp_path / "hub").params)
    step = max((tmp_path / "run" / "checkpoints").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    tuned = flatten(checkpoint.open_step(step).host_arrays("params"))
    encoder = [p for p in tuned if p.split("/")[0] in ("cls_token", "pos_embed", "patch_embed") or p.startswith("blocks_")]
    assert len(encoder) == len([p for p in hub if p.split("/")[0] in ("cls_token", "pos_embed", "patch_embed")
                                or p.startswith("blocks_")])  # fmt: skip
    assert_same_bits({p: tuned[p] for p in encoder}, {p: hub[p] for p in encoder})
    assert "head/kernel" in tuned and "head/kernel" not in hub


def test_resume_from_a_hub_mae_of_other_fields_is_one_line_naming_the_params(tmp_path, demo_root):
    """A `qkv_bias: false` directory does not fit the flags' model (q, k, v with biases): one line."""
    tiny_hf("ViTMAEForPreTraining", qkv_bias=False).save_pretrained(tmp_path / "hub")
    with pytest.raises(SystemExit, match=r"--resume \S+hub: its params do not fit the model of the flags \(missing "
                                         r"\['blocks_0/attn/qkv/bias', 'blocks_1/attn/qkv/bias', 'decoder_blocks_0"):
        main_cli.main(["pretrain", "--model", "mae_vit_test_patch4", "--input_size", "32", "--batch_size", "8",
                       "--epochs", "1", "--data_path", str(demo_root), "--resume", str(tmp_path / "hub"),
                       "--output_dir", str(tmp_path / "run")])  # fmt: skip
