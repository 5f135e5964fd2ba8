"""The synthetic demo dataset: deterministic, consistent part ids, learnable classes, an
atomic cache, and the real pipeline reading it."""

import json
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import pretrain_batches
from PIL import Image

from semmae_jax.data import demo
from semmae_jax.data.sources import image_folder


def files_of(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_in_the_dataset_layout(tmp_path):
    counts = {"train": 2, "val": 1}
    demo.write_demo_dataset(tmp_path / "a", counts)
    demo.write_demo_dataset(tmp_path / "b", counts)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    for split, per_class in counts.items():
        # every image has its part map (missing ones would be an error), classes in plan order
        source = image_folder(tmp_path / "a", split, part_path=tmp_path / "a" / "parts")
        assert source.classes == tuple(demo.BODY_PLANS) and source.num_examples == 4 * per_class
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["part_names"] == list(demo.PART_NAMES) and meta["classes"] == list(demo.BODY_PLANS)


def rendered(per_class: int, seed: int = 0):
    for class_id, name in enumerate(demo.BODY_PLANS):
        for k in range(per_class):
            image, labels = demo.render(name, np.random.default_rng([seed, class_id, k]))
            yield class_id, image, labels


def test_part_ids_mean_the_same_kind_of_part_in_every_image():
    present = np.zeros(len(demo.PART_NAMES))
    images = list(rendered(10))
    for _, image, labels in images:
        hsv = np.asarray(Image.fromarray(image).convert("HSV"), np.float64) / 255
        assert labels.max() < len(demo.PART_NAMES)
        assert hsv[labels == demo.BACKGROUND, 1].mean() < 0.35  # the background is greyish
        for part, hue in demo.PART_HUES.items():
            if (labels == part).sum() < 5:
                continue
            present[part] += 1
            angle = 2 * np.pi * hsv[labels == part, 0]
            mean_hue = np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi)
            assert abs((mean_hue - hue + 0.5) % 1.0 - 0.5) < 0.07, (part, mean_hue)
    assert (present[1:] >= 0.9 * len(images)).all()  # every part shows in nearly every image


def test_classes_differ_enough_to_be_learnt():
    """Nearest centroid on part-area fractions beats chance (0.25) by far."""

    def features(labels):
        areas = np.bincount(labels.ravel(), minlength=len(demo.PART_NAMES))[1:].astype(float)
        return areas / areas.sum()

    train = [(c, features(labels)) for c, _, labels in rendered(20, seed=1)]
    test = [(c, features(labels)) for c, _, labels in rendered(10, seed=2)]
    centroids = np.array([np.mean([f for c, f in train if c == k], axis=0) for k in range(len(demo.BODY_PLANS))])
    predictions = [np.linalg.norm(centroids - f, axis=1).argmin() for _, f in test]
    assert np.mean([p == c for p, (c, _) in zip(predictions, test, strict=True)]) > 0.8


KILLED_MID_WAY = """
import os, sys
from semmae_jax.data import demo
def killed(root):
    (root / "train").mkdir()
    os.kill(os.getpid(), 9)  # no clean-up code can run
demo.write_demo_dataset = killed
demo.demo_data(sys.argv[1])
"""


def test_a_killed_generation_never_looks_finished(tmp_path):
    run = subprocess.run([sys.executable, "-c", KILLED_MID_WAY, str(tmp_path)], check=False, timeout=300)
    assert run.returncode == -9
    assert not (tmp_path / demo.VERSION).exists()
    assert [p.name.startswith(f".{demo.VERSION}-incomplete-") for p in tmp_path.iterdir()] == [True]


def test_the_cache_is_written_atomically(tmp_path, monkeypatch):
    def interrupted(root):
        (root / "train").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "write_demo_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.demo_data(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a finished-looking folder nor scraps

    (tmp_path / f".{demo.VERSION}-incomplete-killed" / "train").mkdir(parents=True)  # a run killed mid-way
    monkeypatch.setattr(demo, "write_demo_dataset", lambda root: (root / "done").write_text("yes"))
    root = demo.demo_data(tmp_path)
    assert root == tmp_path / demo.VERSION and (root / "done").exists()

    monkeypatch.setattr(demo, "write_demo_dataset", interrupted)
    assert demo.demo_data(tmp_path) == root  # finished: never generated again
    monkeypatch.setenv("SEMMAE_CACHE", str(tmp_path))
    assert demo.demo_data() == root


def test_the_demo_dataset_feeds_the_pipeline(tmp_path):
    root = demo.demo_data(tmp_path)
    assert len(list((root / "train").rglob("*.jpg"))) == 512 and len(list((root / "val").rglob("*.jpg"))) == 128
    batches = pretrain_batches(str(root), str(root / "parts"), batch_size=16, img_size=64, patch_size=8)
    labels = next(batches)["part_labels"]
    assert labels.shape == (16, 64)
    assert set(np.unique(labels)) <= set(range(len(demo.PART_NAMES))) and len(np.unique(labels)) >= 3
