"""Image-folder sources: torchvision's label ids, the layouts accepted, clear errors."""

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from semmae_jax.data.datasets import open_source
from semmae_jax.data.part_maps import write_part_map
from semmae_jax.data.sources import image_folder


def touch_image(path, size=(4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(
        path, format="PNG" if path.suffix.lower() == ".png" else "JPEG"
    )


def test_labels_and_order_match_torchvision_imagefolder(tmp_path):
    # Names that sort differently under other rules (case, digits, punctuation),
    # a nested folder, upper-case extensions and files ImageFolder ignores.
    files = ["b/1.JPEG", "B/2.png", "a_b/x.jpg", "a.b/y.JPG", "10/z.jpeg", "9/deep/er/w.png", "9/v.Png", "a/img.jpg"]
    for name in files:
        touch_image(tmp_path / "train" / name)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "a" / "mask.npy").write_bytes(b"")

    source = image_folder(tmp_path, "train")
    reference = ImageFolder(tmp_path / "train")
    assert list(source.classes) == reference.classes
    assert list(zip(source.paths, source.labels, strict=True)) == [(str(p), label) for p, label in reference.samples]


def test_a_bare_image_folder_is_accepted_for_training(tmp_path):
    touch_image(tmp_path / "cat" / "1.png")
    touch_image(tmp_path / "dog" / "2.png")
    assert list(image_folder(tmp_path, "train").labels) == [0, 1]
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        image_folder(tmp_path, "val")


def test_missing_or_empty_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        image_folder(tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no class folder and no image in {tmp_path / 'train'}"):
        image_folder(tmp_path)


def test_a_flat_folder_is_read_unlabelled_in_name_order_and_refused_where_labels_are_needed(tmp_path):
    for name in ("b.png", "a.PNG", "c.jpg"):
        touch_image(tmp_path / "tiles" / name)
    (tmp_path / "tiles" / "notes.txt").write_text("not an image")
    source = image_folder(tmp_path / "tiles", "train")
    assert list(source.paths) == [str(tmp_path / "tiles" / n) for n in ("a.PNG", "b.png", "c.jpg")]
    assert list(source.labels) == [-1, -1, -1] and source.num_classes == 0
    assert open_source(tmp_path / "tiles").num_examples == 3
    with pytest.raises(ValueError, match=r"--data_path .*tiles: its train images have no class folders \(unlabelled\); "
                                         r"this command needs labels: train/<class>/<image>"):
        open_source(tmp_path / "tiles", labelled=True)
    touch_image(tmp_path / "tiles" / "cat" / "1.png")  # images beside class folders are not read, as in torchvision
    assert list(image_folder(tmp_path / "tiles", "train").labels) == [0]


def test_a_class_folder_without_images_is_an_error_naming_it(tmp_path):
    touch_image(tmp_path / "train" / "full" / "1.png")
    (tmp_path / "train" / "hollow").mkdir()
    (tmp_path / "train" / "hollow" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"no image in class folder.*{tmp_path / 'train' / 'hollow'}"):
        image_folder(tmp_path)


def test_missing_part_map_error_names_the_image(tmp_path):
    touch_image(tmp_path / "train" / "c" / "has.png")
    touch_image(tmp_path / "train" / "c" / "lacks.jpg")
    write_part_map(tmp_path / "parts" / "train" / "c" / "has.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of 2 images .*lacks\.jpg.*expected .*parts/train/c/lacks\.png"):
        image_folder(tmp_path, part_path=tmp_path / "parts")


def test_missing_part_map_unlabelled_is_counted(tmp_path):
    touch_image(tmp_path / "train" / "c" / "has.png")
    touch_image(tmp_path / "train" / "c" / "lacks.jpg")
    write_part_map(tmp_path / "parts" / "train" / "c" / "has.png", np.zeros((4, 4), np.uint8))
    source = image_folder(tmp_path, part_path=tmp_path / "parts", missing_parts="unlabelled")
    assert source.missing_parts == (str(tmp_path / "train" / "c" / "lacks.jpg"),)
    assert list(source.part_paths) == [str(tmp_path / "parts" / "train" / "c" / "has.png"), ""]


def test_open_source_checks_its_flags(tmp_path):
    with pytest.raises(ValueError, match="needs --data_path"):
        open_source(None)
    with pytest.raises(ValueError, match="unknown dataset"):
        open_source(tmp_path, dataset="imagenet")
    with pytest.raises(FileNotFoundError, match="--part_path"):
        touch_image(tmp_path / "train" / "c" / "1.png")
        open_source(tmp_path, part_path=tmp_path / "absent")
