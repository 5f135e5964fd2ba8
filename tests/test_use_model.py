"""Using a trained model: `main.py visualize`, `features` and `knn`, against timm and scikit-learn.

One short demo pretraining run (module fixture, a tiny model on the demo data) is the
"demo model" that `visualize` and `knn --checkpoint` read; a timm ViT saved as a `.pth` is
the ground truth of `features`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_helpers import randomize_

from convert.arch import full_config
from convert.parity.references import timm_classifier
from convert.reader import ConverterReader
from convert.safe_load import save_torch_checkpoint
from semmae_jax.cli import main as cli_main
from semmae_jax.inference import visualize
from semmae_jax.inference.features import load_features
from semmae_jax.inference.knn import knn_accuracy, knn_classify
from semmae_jax.models import patchify

pytestmark = pytest.mark.usefixtures("demo_root")
FAST = ["--input_size", "32", "--num_workers", "2", "--batch_size", "8"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo preset (SemMAE setting 3, norm_pix_loss) on `mae_vit_test_patch4`: 48 steps of 16 images."""
    out = tmp_path_factory.mktemp("demo_run")
    cli_main(["pretrain", "--config", "demo", "--model", "mae_vit_test_patch4", "--input_size", "32",
              "--batch_size", "2", "--epochs", "3", "--steps_per_epoch", "16", "--blr", "0.016", "--warmup_epochs", "1",
              "--num_workers", "2", "--log_every", "16", "--vis_every", "3", "--save_every", "3",
              "--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def timm_pth(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A cls-token timm ViT of `vit_test_patch4`'s shape with random weights, saved as a .pth."""
    model = randomize_(timm_classifier(full_config("vit_test_patch4", num_classes=4, global_pool=False)), seed=0)
    path = tmp_path_factory.mktemp("pth") / "vit.pth"
    save_torch_checkpoint(path, {k: v.numpy() for k, v in model.state_dict().items()})
    return path, model


def eval_images(demo_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The val split's images as `features` sees them (EvalTransform at 32), with their labels, in order."""
    from semmae_jax import data

    source = data.open_source(str(demo_root), "val")
    batches = list(data.eval_batches(source, process_batch=64, img_size=32, process_index=0, process_count=1))
    mask = np.concatenate([b["mask"] for b in batches])
    return (np.concatenate([b["image"] for b in batches])[mask], np.concatenate([b["label"] for b in batches])[mask])


# ---------------------------------------------------------------------------------- features


def test_features_equal_timms_forward_features_on_the_same_pth(timm_pth, demo_root, tmp_path):
    path, model = timm_pth
    images, labels = eval_images(demo_root)
    grid = images.shape[1] // 4  # vit_test_patch4
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    expected = {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(1),
                "patch": tokens[:, 1:].reshape(len(tokens), grid, grid, -1)}
    for which in ("cls", "mean", "patch"):
        out = tmp_path / f"{which}.npz"
        cli_main(["features", "--checkpoint", str(path), "--data_path", str(demo_root), "--split", "val",
                  "--tokens", which, *FAST, "--out", str(out)])
        found = load_features(out)
        np.testing.assert_allclose(found.features, expected[which], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(found.labels, labels)
        assert found.layers is None
    names = [str(p) for p in sorted((demo_root / "val").rglob("*.jpg"))]
    assert list(found.file_names) == names  # every image once, in the source's order


def test_chosen_blocks_patch_maps_equal_timms_forward_intermediates(timm_pth, demo_root, tmp_path):
    """ViTDet / UperNet read blocks' outputs before the final norm as NCHW maps: timm's `forward_intermediates`."""
    path, model = timm_pth
    images, _ = eval_images(demo_root)
    layers = [1, 0]  # in the order asked for
    with torch.no_grad():
        maps = model.forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2), indices=sorted(layers),
                                           norm=False, output_fmt="NCHW", intermediates_only=True)
    by_block = dict(zip(sorted(layers), (m.numpy() for m in maps), strict=True))
    out = tmp_path / "layers.npz"
    cli_main(["features", "--checkpoint", str(path), "--data_path", str(demo_root), "--split", "val",
              "--tokens", "patch", "--layers", ",".join(map(str, layers)), *FAST, "--out", str(out)])
    found = load_features(out)
    assert list(found.layer_indices) == layers
    for j, block in enumerate(layers):  # channels last here: [N, h, w, D] -> NCHW as a detection neck reads it
        np.testing.assert_allclose(found.layers[:, j].transpose(0, 3, 1, 2), by_block[block], atol=1e-4, rtol=0)
    with pytest.raises(SystemExit, match=r"--layers 0,9: give distinct block indices 0\.\.1 \(this encoder has 2 blocks\)"):
        cli_main(["features", "--checkpoint", str(path), "--data_path", str(demo_root), "--layers", "0,9", *FAST,
                  "--out", str(out)])
    with pytest.raises(SystemExit, match=r"--tokens patch: k-NN scores one vector per image"):
        cli_main(["knn", "--checkpoint", str(path), "--tokens", "patch"])


def test_rows_of_several_processes_map_to_the_examples_they_hold():
    """2 processes, 5 examples, 2 rows each a batch: process 0 reads 0..2, process 1 reads 3..4
    (`eval_share`); batch 0 is [0, 1 | 3, 4], batch 1 is [2, pad | pad, pad]."""
    from semmae_jax.inference.features import row_ids

    np.testing.assert_array_equal(row_ids(5, 2, 2), [0, 1, 3, 4, 2, -1, -1, -1])
    np.testing.assert_array_equal(row_ids(7, 2, 3), [0, 1, 3, 4, 5, 6, 2, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(row_ids(3, 4, 1), [0, 1, 2, -1])


# --------------------------------------------------------------------------------------- knn


def test_knn_at_a_large_temperature_is_scikit_learns_majority_vote():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 16)), rng.normal(size=(80, 16))
    labels, test_labels = rng.integers(0, 6, 300), rng.integers(0, 6, 80)
    for k in (1, 7, 20):
        reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train, labels)
        ours = knn_classify(train, labels, test, k=k, temperature=1e9)
        np.testing.assert_array_equal(ours, reference.predict(test))
        acc1 = knn_accuracy(train, labels, test, test_labels, k=k, temperature=1e9).acc1
        assert acc1 == pytest.approx(100 * reference.score(test, test_labels))


def test_knn_is_exact_on_a_separable_set_and_weighs_votes_by_similarity():
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:6] * 10
    train = np.repeat(centres, 20, axis=0) + rng.normal(scale=0.5, size=(120, 8))
    test = np.repeat(centres, 5, axis=0) + rng.normal(scale=0.5, size=(30, 8))
    result = knn_accuracy(train, np.repeat(np.arange(6), 20), test, np.repeat(np.arange(6), 5), k=10)
    assert (result.acc1, result.acc5, result.count) == (100.0, 100.0, 30)
    # Two far neighbours of class 1 against one near neighbour of class 0: uniform votes pick 1,
    # DINO's exp(sim / T) at T = 0.07 picks 0 (e^(1/0.07) against 2 e^(0.8/0.07)).
    near, far = [1.0, 0.0], [0.8, 0.6]
    train, labels = np.array([near, far, far]), np.array([0, 1, 1])
    assert knn_classify(train, labels, np.array([[1.0, 0.0]]), k=3, temperature=0.07)[0] == 0
    assert knn_classify(train, labels, np.array([[1.0, 0.0]]), k=3, temperature=1e9)[0] == 1


def test_knn_of_a_checkpoint_extracts_both_splits_and_scores_them(demo_run, demo_root, tmp_path, capsys):
    out = tmp_path / "knn.json"
    cli_main(["knn", "--checkpoint", str(demo_run), "--data_path", str(demo_root), *FAST, "--k", "5",
              "--out", str(out)])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("* k-NN"))
    result = json.loads(out.read_text())
    assert line.startswith(f"* k-NN Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} (k 5")
    assert result["count"] == 128 and result["train"] == 512 and result["acc5"] >= result["acc1"] > 0


def test_knn_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"nowhere.npz is not a readable .npz of features") as error:
        cli_main(["knn", "--train", str(tmp_path / "nowhere.npz"), "--val", str(tmp_path / "nowhere.npz")])
    assert "\n" not in str(error.value)
    np.savez(tmp_path / "other.npz", values=np.zeros(3))
    with pytest.raises(SystemExit, match=r"other.npz lacks \['features', 'labels', 'file_names'\]"):
        cli_main(["knn", "--train", str(tmp_path / "other.npz"), "--val", str(tmp_path / "other.npz")])
    np.savez(tmp_path / "flat.npz", features=np.eye(3), labels=np.full(3, -1), file_names=np.array(["a", "b", "c"]))
    with pytest.raises(SystemExit, match=r"the training features have no labels \(images without class folders\)"):
        cli_main(["knn", "--train", str(tmp_path / "flat.npz"), "--val", str(tmp_path / "flat.npz"), "--k", "1"])


# --------------------------------------------------------------------------------- visualize


def test_visualize_reconstructs_the_demo_model_and_draws_the_masks(demo_run, demo_root, tmp_path):
    from semmae_jax.jobs import visualize as visualize_job

    images = [str(p) for p in sorted((demo_root / "val").rglob("*_0001.jpg"))[:2]]
    maps = [str(demo_root / "parts" / Path(p).relative_to(demo_root).with_suffix(".png")) for p in images]
    out = tmp_path / "fig.png"
    args = visualize_job.parse(["--checkpoint", str(demo_run), *images, "--part_map", *maps, "--seed", "3",
                                "--out", str(out)])
    v = visualize_job.draw(args, ConverterReader())
    removed = 64 - int(64 * (1 - 0.75))  # MAE's count: L - int(L * (1 - r))
    for mask in [v.mask, *v.alpha_masks]:
        np.testing.assert_array_equal(mask.sum(1), [removed, removed])
    assert len(v.alpha_masks) == 3 and not np.array_equal(v.alpha_masks[0], v.alpha_masks[2])
    np.testing.assert_array_equal(v.mask, v.alpha_masks[0])  # the reconstruction's mask is the first alpha's
    # On the masked patches, the model's reconstruction is closer to the image than a fill with each patch's
    # own mean colour (what a norm_pix_loss model gets for free) and than the dataset's mean colour.
    target = np.asarray(patchify(v.images, 4))
    pasted = np.asarray(patchify(visualize.reconstruction(v.images, v.pred, v.mask, 4, True), 4))
    removed_patches = v.mask > 0

    def error(fill: np.ndarray) -> float:
        return float(((fill - target) ** 2).mean(-1)[removed_patches].mean())

    ours = error(pasted)
    assert ours < error(np.broadcast_to(target.mean(-1, keepdims=True), target.shape))
    assert ours < error(np.zeros_like(target))
    # The figure: per image MAE's row and the part-map row, 4 cells of 32 px enlarged 5x (+ borders) each.
    figure = np.asarray(Image.open(out))
    cell, band = 5 * 32 + 2, visualize.TEXT_BAND
    assert figure.shape[1] == 4 * cell and (figure.shape[0] - 4 * (band + cell)) % band == 0
    assert 2 * band <= figure.shape[0] - 4 * (band + cell) <= 4 * band  # the caption, norm_pix_loss said
    first = figure[band + 1 : band + cell - 1, 1 : cell - 1]
    np.testing.assert_array_equal(first, np.repeat(np.repeat(visualize.to_uint8(v.images[0]), 5, 0), 5, 1))
    parts_row = figure[2 * band + cell + 1 : 2 * (band + cell) - 1, 1 : cell - 1]
    colours = visualize.part_colours(v.part_labels[0], (8, 8), (160, 160))
    np.testing.assert_array_equal(parts_row, colours)
    # The same model converted to a .pth draws the same masks and predictions.
    from convert.core import flax_to_torch
    from semmae_jax.checkpoint import load_params

    pth = tmp_path / "demo.pth"
    save_torch_checkpoint(pth, flax_to_torch(load_params(demo_run / "checkpoints")[0], "mae_vit_test_patch4"))
    args = visualize_job.parse(["--checkpoint", str(pth), *images, "--part_map", *maps, "--seed", "3",
                                "--norm_pix_loss", "--out", str(tmp_path / "pth.png")])
    from_pth = visualize_job.draw(args, ConverterReader())
    np.testing.assert_array_equal(from_pth.mask, v.mask)
    np.testing.assert_allclose(from_pth.pred, v.pred, atol=1e-5)


def test_visualize_bad_input_is_one_line_naming_the_file(demo_run, demo_root, timm_pth, tmp_path):
    image = str(demo_root / "val" / "blob" / "blob_0000.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    small_map = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(small_map)
    out = str(tmp_path / "fig.png")
    cases = [
        (["--checkpoint", str(demo_run), str(broken), "--out", out], rf"{broken} is not a readable image"),
        (["--checkpoint", str(demo_run), image, "--part_map", str(small_map), "--out", out],
         rf"part map {small_map} is 12x10, its image {image} 96x96"),
        (["--checkpoint", str(timm_pth[0]), image, "--out", out], "a model without a decoder: visualize needs a "
                                                                  "pretraining checkpoint"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message) as error:
            cli_main(["visualize", *argv])
        assert "\n" not in str(error.value) and str(error.value).startswith("main.py visualize: error: ")


def test_eval_transform_warps_a_part_map_as_its_image(tmp_path):
    """The part labels of the eval crop equal the map resized (nearest) and centre-cropped like the image."""
    from semmae_jax.data.part_maps import patch_vote
    from semmae_jax.data.tf_runtime import tf
    from semmae_jax.data.transforms import EvalTransform

    rng = np.random.default_rng(0)
    part_map = np.repeat(np.repeat(rng.integers(0, 5, (10, 15)), 6, 0), 6, 1).astype(np.uint8)  # 60 x 90
    Image.fromarray(part_map, mode="L").save(tmp_path / "map.png")
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), np.uint8)).save(tmp_path / "image.png")
    raw = {"image": tf.constant((tmp_path / "image.png").read_bytes()),
           "part": tf.constant((tmp_path / "map.png").read_bytes()), "pil": tf.constant(False)}
    labels = EvalTransform(32, patch_size=4)(raw, tf.zeros([2], tf.int64))["part_labels"].numpy()
    resized = np.asarray(Image.fromarray(part_map).resize((54, 36), Image.NEAREST))  # short side int(32 / 0.875)
    top, left = round((36 - 32) / 2), round((54 - 32) / 2)
    np.testing.assert_array_equal(labels, patch_vote(resized[top : top + 32, left : left + 32], 4))
