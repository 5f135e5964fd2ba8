"""Images that are not 8-bit RGB (`semmae_jax.data.bands`): TIFF / GeoTIFF of any bands, 16-bit PNG and
`.npy` read without loss, per-band statistics measured and stored with the dataset, the bad-input lines,
and a 4-band 16-bit TIFF set at 96 x 160 from `prepare` to non-square pretraining (24 x 40), fine-tuning
at another size (32 x 48), stage 1, features, `convert to-torch` and timm on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tifffile
import torch
from PIL import Image
from torch_helpers import jax_apply, nchw

from convert import cli as convert_cli
from convert.arch import full_config
from convert.parity import references
from semmae_jax import checkpoint
from semmae_jax.cli import main as cli_main
from semmae_jax.data import bands
from semmae_jax.data.pipeline import TrainLoader
from semmae_jax.data.sources import image_folder
from semmae_jax.data.transforms import EvalTransform, TrainTransform
from semmae_jax.models import create_model
from semmae_jax.runtime.run_log import epoch_lines


def tile(rng: np.random.Generator, label: int, shape=(96, 160, 4), dtype=np.uint16) -> np.ndarray:
    """A 16-bit tile whose bands' levels say its class (values far above 255: 8 bits would lose them)."""
    levels = 3000 + 9000 * label * np.arange(1, shape[-1] + 1)
    return (rng.integers(0, 4000, shape) + levels).astype(dtype)


def write_tiff_set(root: Path, per_class: dict[str, int], seed: int = 0) -> dict[Path, np.ndarray]:
    """Two classes of 4-band tiles, alternately band-interleaved and planar (as GeoTIFFs come)."""
    rng, written = np.random.default_rng(seed), {}
    for split, count in per_class.items():
        for label in range(2):
            for k in range(count):
                path = root / split / f"class{label}" / f"{k}.tif"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = tile(rng, label)
                if k % 2:
                    tifffile.imwrite(path, pixels.transpose(2, 0, 1), photometric="minisblack",
                                     planarconfig="separate")
                else:
                    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig")
                written[path] = pixels
    return written


def test_every_format_reads_as_stored(tmp_path):
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    six = rng.standard_normal((20, 30, 6)).astype(np.float32)
    np.save(tmp_path / "six.npy", six)
    planar = tile(rng, 1, (20, 30, 13))
    tifffile.imwrite(tmp_path / "planar.tif", planar.transpose(2, 0, 1), photometric="minisblack",
                     planarconfig="separate")
    for name, expected in (("grey16.png", grey16[..., None]), ("six.npy", six), ("planar.tif", planar)):
        read = bands.read_pixels((tmp_path / name).read_bytes())
        assert read.dtype == expected.dtype, name
        np.testing.assert_array_equal(read, expected, err_msg=name)
        assert bands.header(tmp_path / name) == (expected.shape[-1], str(expected.dtype))


def test_npy_arrays_are_images_where_bands_are_read_and_not_in_an_rgb_folder(tmp_path):
    from semmae_jax.data.datasets import open_source

    rng = np.random.default_rng(6)
    for k in range(2):
        (tmp_path / "train" / "c").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "train" / "c" / f"{k}.npy", rng.integers(0, 256, (8, 8, 2)).astype(np.uint8))
    Image.fromarray(np.zeros((8, 8, 2), np.uint8), mode="LA").save(tmp_path / "train" / "c" / "grey_alpha.png")
    stats = bands.Bands((0.0, 0.0), (1.0, 1.0))
    listed = ["0.npy", "1.npy", "grey_alpha.png"]
    assert [Path(p).name for p in open_source(tmp_path, "train", bands=stats).paths] == listed
    assert [Path(p).name for p in open_source(tmp_path, "train").paths] == ["grey_alpha.png"]  # torchvision's listing


def test_files_that_disagree_are_one_line_naming_the_file(tmp_path):
    rng = np.random.default_rng(2)
    written = {"a.tif": tile(rng, 0, (8, 8, 4)), "b.tif": tile(rng, 0, (8, 8, 3)),
               "c.tif": tile(rng, 0, (8, 8, 4)).astype(np.float32)}
    for name, pixels in written.items():
        tifffile.imwrite(tmp_path / name, pixels, photometric="minisblack", planarconfig="contig")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'b.tif'} has 3 band\(s\), the model takes 4 \(--in_chans\)$"):
        bands.scan([str(tmp_path / n) for n in ("a.tif", "b.tif")], 4)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'c.tif'} holds float32 samples, {tmp_path / 'a.tif'} holds "
                                         "uint16"):
        bands.scan([str(tmp_path / n) for n in ("a.tif", "c.tif")], 4)
    assert bands.scan([str(tmp_path / "a.tif")], 4) == "uint16"


def test_statistics_come_from_the_flags_or_the_dataset_and_must_fit(tmp_path):
    assert bands.data_bands(tmp_path, 3, None, None) is None  # 8-bit RGB: the RGB path
    with pytest.raises(ValueError, match=r"4-band images need their statistics: --mean and --std .* `main.py prepare "
                                         rf"--data_path {tmp_path} --stats`"):
        bands.data_bands(tmp_path, 4, None, None)
    bands.save_stats(tmp_path, bands.Bands((1.0, 2.0), (3.0, 4.0)), 5)
    assert bands.data_bands(tmp_path, 2, None, None) == bands.Bands((1.0, 2.0), (3.0, 4.0))
    with pytest.raises(ValueError, match=r"band_stats.json describe 2 band\(s\), the model takes 4 \(--in_chans\)"):
        bands.data_bands(tmp_path, 4, None, None)
    with pytest.raises(ValueError, match="--mean and --std go together"):
        bands.data_bands(tmp_path, 2, (1.0, 2.0), None)


def test_measured_statistics_are_every_pixels_mean_and_std(tmp_path):
    written = write_tiff_set(tmp_path, {"train": 2})
    measured = bands.measure([str(p) for p in sorted(written)])
    every = np.concatenate([pixels.reshape(-1, 4) for pixels in written.values()]).astype(np.float64)
    np.testing.assert_allclose(measured.mean, every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(measured.std, every.std(0), rtol=1e-9)


def test_the_eval_transform_keeps_16_bit_values_and_normalises_per_band(tmp_path):
    """At the image's own size (crop_pct 1) the transform is decode + normalise: exact 16-bit values."""
    written = write_tiff_set(tmp_path, {"val": 1})
    stats = bands.Bands((100.0, 200.0, 300.0, 400.0), (10.0, 20.0, 30.0, 40.0))
    transform = EvalTransform((96, 160), crop_pct=1.0, bands=stats)
    for path, pixels in written.items():  # band-interleaved and planar alike
        raw = {"image": tf.constant(path.read_bytes()), "part": tf.constant(b""), "pil": tf.constant(False)}
        out = transform(raw, tf.constant([0, 0], tf.int64))["image"].numpy()
        np.testing.assert_allclose(out, (pixels - np.array(stats.mean)) / np.array(stats.std), rtol=1e-6, atol=1e-4)


def test_one_band_16_bit_pngs_train_as_float_batches(tmp_path):
    rng = np.random.default_rng(3)
    for k in range(4):
        path = tmp_path / "train" / "scans" / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(20000, 60000, (40, 48), dtype=np.uint16)).save(path)
    stats = bands.Bands((40000.0,), (10000.0,))
    source = image_folder(tmp_path, "train")
    loader = TrainLoader(source, process_batch=4, transform=TrainTransform((16, 24), patch_size=8, bands=stats),
                         seed=0, process_index=0, process_count=1)
    batch = next(iter(loader.epoch_batches(0)))
    assert batch["image"].shape == (4, 16, 24, 1) and batch["image"].dtype == np.float32
    assert -2.5 < batch["image"].mean() < 2.5 and batch["image"].std() > 0.3  # 16-bit values, normalised
    with pytest.raises(ValueError, match="RandAugment's operations are defined on 8-bit RGB pixels: with 1-band "
                                         "images use --aa none"):
        TrainTransform(32, bands=stats, pixel_augment=lambda image, seed: image)


@pytest.mark.slow
def test_a_4_band_16_bit_tiff_set_from_prepare_to_timm(tmp_path, capsys):
    data, packed = tmp_path / "tiles", tmp_path / "packed"
    write_tiff_set(data, {"train": 8, "val": 4})
    cli_main(["prepare", "--data_path", str(data), "--out", str(packed), "--stats"])
    stored = json.loads((packed / bands.STATS_FILE).read_text())
    assert stored["images"] == 16 and stored["mean"][3] > 10000  # 16-bit units, measured over train/
    assert (data / bands.STATS_FILE).read_text() == (packed / bands.STATS_FILE).read_text()

    flags = ["--in_chans", "4", "--input_size", "24", "40", "--global_batch_size", "8", "--epochs", "1", "--steps_per_epoch",
             "2", "--warmup_epochs", "1", "--num_workers", "2"]
    pretrained, tuned = tmp_path / "pretrain", tmp_path / "finetune"
    cli_main(["pretrain", "--model", "mae_vit_test_patch4", "--data_path", str(packed), "--setting", "0", *flags,
              "--vis_every", "1", "--output_dir", str(pretrained)])  # the statistics stored with the packed copy
    assert np.isfinite(epoch_lines(pretrained)[-1]["train_loss"])
    with pytest.raises(SystemExit, match="RandAugment's operations are defined on 8-bit RGB pixels"):
        cli_main(["finetune", "--model", "vit_test_patch4", "--data_path", str(data), "--nb_classes", "2", *flags,
                  "--finetune", str(pretrained / "checkpoints"), "--output_dir", str(tmp_path / "refused")])
    cli_main(["finetune", "--model", "vit_test_patch4", "--data_path", str(data), "--nb_classes", "2", "--aa", "none",
              *flags, "--input_size", "32", "48", "--finetune", str(pretrained / "checkpoints"),
              "--output_dir", str(tuned)])  # at another size: the position table resampled, 6x10 -> 8x12
    assert 0 <= epoch_lines(tuned)[-1]["test_acc1"] <= 100
    cli_main(["parts", "train", "--config", "parts_demo", "--backbone", str(pretrained), "--data_path", str(packed),
              "--global_batch_size", "8", "--epochs", "1", "--steps_per_epoch", "2", "--warmup_epochs", "1",
              "--num_workers", "2", "--output_dir", str(tmp_path / "parts")])  # stage 1 on the bands, on the 6x10 grid
    assert "at 24x40 (6x10 patches)" in capsys.readouterr().out
    assert np.isfinite(epoch_lines(tmp_path / "parts")[-1]["train_loss"])
    cli_main(["features", "--checkpoint", str(pretrained), "--data_path", str(packed), "--split", "val", "--tokens",
              "patch", "--batch_size", "1", "--out", str(tmp_path / "features.npz")])  # bands and size: the run's
    assert np.load(tmp_path / "features.npz")["features"].shape == (8, 6, 10, 32)

    convert_cli.main(["to-torch", str(tuned / "checkpoints"), str(tmp_path / "tuned.pth")])
    params, _ = checkpoint.load_params(tuned / "checkpoints")
    config = full_config("vit_test_patch4", img_size=(32, 48), in_chans=4, num_classes=2)
    reference = references.timm_classifier(config)
    reference.load_state_dict(torch.load(tmp_path / "tuned.pth", weights_only=True)["model"], strict=True)
    x = np.random.default_rng(4).standard_normal((2, 32, 48, 4)).astype(np.float32)
    with torch.no_grad():
        expected = reference(nchw(x)).numpy()
    got = jax_apply(create_model("vit_test_patch4", img_size=(32, 48), in_chans=4, num_classes=2), params, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.usefixtures("demo_root")
def test_a_dataset_with_a_file_of_other_bands_stops_before_any_step(tmp_path):
    data = tmp_path / "tiles"
    write_tiff_set(data, {"train": 2})
    odd = data / "train" / "class1" / "odd.tif"
    tifffile.imwrite(odd, tile(np.random.default_rng(5), 1, (96, 160, 3)), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(SystemExit, match=rf"{odd} has 3 band\(s\), the model takes 4 \(--in_chans\)"):
        cli_main(["pretrain", "--model", "mae_vit_test_patch4", "--in_chans", "4", "--mean", "1", "1", "1", "1",
                  "--std", "1", "1", "1", "1", "--data_path", str(data), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoints").exists()
