"""Fine-tuning, evaluation and linear probing: parity of the eval with timm + torchvision,
loading a pretraining checkpoint, mesh-independent metrics, a short fine-tune that learns."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torch_helpers import randomize_
from torchvision import transforms

from convert.arch import full_config
from convert.parity.references import timm_classifier
from convert.safe_load import save_torch_checkpoint
from semmae_jax import checkpoint
from semmae_jax.cli import main as cli_main
from semmae_jax.models import create_model
from semmae_jax.runtime.run_log import epoch_lines
from semmae_jax.train.state import merge_pretrained

pytestmark = pytest.mark.usefixtures("demo_root")
TINY = ["--model", "vit_test_patch4", "--input_size", "32", "--nb_classes", "4", "--num_workers", "2"]


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A timm ViT of `vit_test_patch4`'s shape with confident random weights, saved as a .pth."""
    model = randomize_(timm_classifier(full_config("vit_test_patch4", num_classes=4)), seed=0)
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # wide logit margins: preprocessing noise must not flip many predictions
    path = tmp_path_factory.mktemp("pth") / "vit_test.pth"
    save_torch_checkpoint(path, {k: v.numpy() for k, v in model.state_dict().items()})
    return path, model


def torch_eval(model: torch.nn.Module, val_dir: Path) -> tuple[float, float, float]:
    """timm + torchvision's eval pipeline, as MAE's `build_transform(is_train=False)`."""
    tf = transforms.Compose([
        transforms.Resize(int(32 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    dataset = torchvision.datasets.ImageFolder(str(val_dir), transform=tf)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    with torch.no_grad():
        logits = model(images)
    top5 = logits.topk(4, dim=1).indices
    acc1 = 100.0 * (top5[:, 0] == labels).float().mean().item()
    acc5 = 100.0 * (top5 == labels[:, None]).any(1).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    return acc1, acc5, loss


def run_eval(capsys, *flags: str) -> dict[str, float]:
    cli_main(["eval", *TINY, *flags])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("* Acc@1"))
    words = line.split()
    return {"acc1": float(words[2]), "acc5": float(words[4]), "loss": float(words[6])}


def test_eval_of_a_timm_pth_matches_timm_and_torchvision(timm_checkpoint, demo_root, capsys, tmp_path):
    """Also: `--eval` reads the validation split alone (the data here has no training split)."""
    path, model = timm_checkpoint
    (tmp_path / "val_only").mkdir()
    (tmp_path / "val_only" / "val").symlink_to(demo_root / "val")
    ours = run_eval(capsys, "--resume", str(path), "--data_path", str(tmp_path / "val_only"), "--batch_size", "4",
                    "--output_dir", str(tmp_path))
    acc1, acc5, loss = torch_eval(model, demo_root / "val")
    images = 128
    assert abs(ours["acc1"] - acc1) <= 100.0 * 2 / images + 1e-3  # at most 2 images flipped by resampling
    assert ours["acc5"] == pytest.approx(acc5, abs=100.0 * 2 / images)
    assert ours["loss"] == pytest.approx(loss, rel=0.02)
    per_class = json.loads((tmp_path / "per_class_accuracy.json").read_text())
    assert sum(v["images"] for v in per_class.values()) == images


def test_eval_figures_do_not_depend_on_the_mesh_or_the_batch(timm_checkpoint, demo_root, capsys, tmp_path):
    path, _ = timm_checkpoint
    common = ["--resume", str(path), "--data_path", str(demo_root), "--output_dir", str(tmp_path)]
    a = run_eval(capsys, *common, "--batch_size", "2", "--mesh", "data:8")
    b = run_eval(capsys, *common, "--batch_size", "5", "--mesh", "data:2,fsdp:2,tensor:2")
    assert (a["acc1"], a["acc5"]) == (b["acc1"], b["acc5"])
    assert a["loss"] == pytest.approx(b["loss"], abs=2e-3)  # printed with 3 decimals


def test_eval_of_a_checkpoint_of_another_shape_is_a_clear_error(timm_checkpoint, demo_root, tmp_path):
    path, _ = timm_checkpoint
    with pytest.raises(SystemExit, match=r"does not fit vit_test_patch4 .* missing \['norm/bias', 'norm/scale'\]"):
        cli_main(["eval", *TINY, "--cls_token", "--resume", str(path), "--data_path", str(demo_root),
                  "--batch_size", "4", "--output_dir", str(tmp_path)])


def test_finetune_from_a_pretraining_checkpoint_takes_exactly_the_encoder():
    mae = create_model("mae_vit_test_patch4")
    images = jnp.zeros((1, 32, 32, 3))
    source = nn.unbox(jax.jit(mae.init)({"params": jax.random.key(0), "mask": jax.random.key(1)}, images)["params"])
    vit = create_model("vit_test_patch4", num_classes=4)
    target = nn.unbox(jax.jit(vit.init)(jax.random.key(2), images)["params"])
    params, missing, unused = merge_pretrained(target, source)
    assert missing == ["fc_norm/bias", "fc_norm/scale", "head/bias", "head/kernel"]
    assert {p.split("/")[0] for p in unused} == {"decoder_blocks_0", "decoder_embed", "decoder_norm", "decoder_pos_embed",
                                                 "decoder_pred", "mask_token", "norm"}
    np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc2"]["kernel"], source["blocks_1"]["mlp"]["fc2"]["kernel"])
    np.testing.assert_array_equal(params["pos_embed"], source["pos_embed"])
    np.testing.assert_array_equal(params["head"]["kernel"], target["head"]["kernel"])  # fresh, std 2e-5


@pytest.mark.slow
def test_a_short_finetune_learns_the_demo_classes_and_keeps_its_best_across_a_resume(demo_root, tmp_path, capsys):
    out = tmp_path / "ft"
    cli_main(["finetune", *TINY, "--epochs", "4", "--batch_size", "4", "--warmup_epochs", "1", "--blr", "2e-2",
              "--aa", "none", "--reprob", "0", "--smoothing", "0", "--drop_path", "0", "--log_every", "8",
              "--data_path", str(demo_root), "--output_dir", str(out)])
    lines = epoch_lines(out)
    assert lines[-1]["test_acc1"] > 45.0  # 4 balanced classes: chance is 25%
    best = max(lines, key=lambda line: line["test_acc1"])
    _, meta = checkpoint.load_params(out / "best")
    assert (meta["epoch"], meta["test_acc1"]) == (best["epoch"], best["test_acc1"])
    assert f"Max accuracy: {best['test_acc1']:.2f}%" in capsys.readouterr().out
    # Resumed with an lr that wrecks the later epochs: the best of the whole run stays, and so does its maximum.
    cli_main(["finetune", *TINY, "--epochs", "6", "--batch_size", "4", "--warmup_epochs", "1", "--blr", "10",
              "--aa", "none", "--reprob", "0", "--smoothing", "0", "--drop_path", "0", "--log_every", "8",
              "--data_path", str(demo_root), "--output_dir", str(out)])
    later = epoch_lines(out)[len(lines):]
    assert [line["epoch"] for line in later] == [4, 5] and all(line["test_acc1"] < best["test_acc1"] for line in later)
    _, meta = checkpoint.load_params(out / "best")
    assert (meta["epoch"], meta["test_acc1"]) == (best["epoch"], best["test_acc1"])
    printed = capsys.readouterr().out
    assert printed.count(f"Max accuracy: {best['test_acc1']:.2f}%") == 2, printed


@pytest.mark.slow
def test_finetune_with_the_full_recipe_and_a_pretrained_encoder_runs(demo_root, tmp_path):
    """RandAugment, random erasing, mixup + cutmix, drop path, layer decay, --finetune, in one run:
    the encoder starts from the pretrained weights, the head from its own init, and each block
    moves by the layer-decay share of the lr."""
    mae = create_model("mae_vit_test_patch4")
    params = jax.jit(mae.init)({"params": jax.random.key(0), "mask": jax.random.key(1)}, jnp.zeros((1, 32, 32, 3)))
    pretrained = jax.tree.map(np.asarray, nn.unbox(params["params"]))
    checkpoint.save_params(tmp_path / "pretrained", pretrained, {"model": "mae_vit_test_patch4"})
    cli_main(["finetune", *TINY, "--epochs", "1", "--batch_size", "2", "--steps_per_epoch", "3", "--mixup", "0.8",
              "--cutmix", "1.0", "--finetune", str(tmp_path / "pretrained"), "--data_path", str(demo_root),
              "--layer_decay", "0.5", "--warmup_epochs", "0", "--blr", "1e-3", "--output_dir", str(tmp_path / "ft")])
    tuned, _ = checkpoint.load_params(tmp_path / "ft" / "checkpoints")
    moved = {name: np.abs(tuned[name]["attn"]["qkv"]["kernel"] - pretrained[name]["attn"]["qkv"]["kernel"]).mean()
             for name in ("blocks_0", "blocks_1")}
    init_gap = np.abs(pretrained["blocks_0"]["attn"]["qkv"]["kernel"]).mean()
    assert 0 < moved["blocks_1"] < 0.05 * init_gap  # started from the pretrained encoder, then trained
    np.testing.assert_allclose(moved["blocks_0"] / moved["blocks_1"], 0.5, rtol=0.2)  # layer decay 0.5 per block
    assert "head" in tuned and "head" not in pretrained and np.abs(tuned["head"]["kernel"]).max() < 0.05
    line = epoch_lines(tmp_path / "ft")[-1]
    assert np.isfinite(line["train_loss"]) and 0.0 <= line["test_acc1"] <= 100.0


@pytest.mark.slow
def test_linear_probe_trains_only_the_head(demo_root, tmp_path, capsys):
    vit = create_model("vit_test_patch4", num_classes=0, global_pool=False)
    encoder = nn.unbox(jax.jit(vit.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    meta = {"model": "vit_test_patch4", "model_overrides": {"num_classes": 0, "global_pool": False}}
    checkpoint.save_params(tmp_path / "encoder", encoder, meta)
    cli_main(["linprobe", *TINY, "--epochs", "2", "--batch_size", "4", "--warmup_epochs", "1",
              "--finetune", str(tmp_path / "encoder"), "--data_path", str(demo_root), "--output_dir",
              str(tmp_path / "probe"), "--log_every", "8"])
    lines = epoch_lines(tmp_path / "probe")
    assert [line["epoch"] for line in lines] == [0, 1] and "test_acc1" in lines[-1]
    head, _ = checkpoint.load_params(tmp_path / "probe" / "checkpoints")
    assert set(head) == {"head"}  # BatchNorm has no affine params; the encoder is not trained


def test_per_class_lines_name_every_class_or_only_the_weakest():
    from semmae_jax.train.evaluate import EvalResult

    per_class = {c: {"images": 10, "acc1": float((c * 37) % 100)} for c in range(25)}
    result = EvalResult(acc1=0.0, acc5=0.0, loss=0.0, count=250, per_class=per_class)
    names = [f"class_{c}" for c in range(25)]
    weakest = result.per_class_lines(names, shown=20).splitlines()
    assert weakest[0] == "Acc@1 of the 20 weakest of 25 classes (the checkpoint's id2label):"
    shown = {line.split()[0] for line in weakest[1:]}
    left_out = sorted(per_class, key=lambda c: per_class[c]["acc1"])[20:]
    assert len(shown) == 20 and not shown & {names[c] for c in left_out}
    assert max(per_class[int(n[6:])]["acc1"] for n in shown) <= min(per_class[c]["acc1"] for c in left_out)
    every = result.per_class_lines(names, shown=25).splitlines()
    assert every[0].startswith("Acc@1 per class") and len(every) == 26
    assert "  class_3                    11.0%  (10 images)" in every
