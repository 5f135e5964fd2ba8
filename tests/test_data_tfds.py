"""The TFDS source, offline: a tiny image-classification builder prepared in a temporary dir
(any network connection attempt is recorded and fails the test)."""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from semmae_jax.data.datasets import open_source
from semmae_jax.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from semmae_jax.data.part_maps import write_part_map
from semmae_jax.data.pipeline import EvalLoader, TrainLoader
from semmae_jax.data.transforms import EvalTransform, TrainTransform

NAME = "semmae_tiny_shapes"
TRAIN, TEST = 26, 11
CLASSES = ["cat", "dog", "fox"]


class SemmaeTinyShapes(tfds.core.GeneratorBasedBuilder):
    """PNGs whose red channel is flat at 6 * index + 3 (green is noise); label index % 3."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(encoding_format="png"),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "file_name": tfds.features.Text(),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, TRAIN), "test": self._generate_examples(TRAIN, TRAIN + TEST)}

    def _generate_examples(self, start, stop):
        rng = np.random.default_rng(start)
        for k in range(start, stop):
            pixels = np.full((18 + k % 5, 21, 3), (6 * k + 3, 0, 90), np.uint8)
            pixels[..., 1] = rng.integers(0, 256, pixels.shape[:2])
            yield k, {"image": pixels, "label": k % 3, "file_name": f"img_{k:03d}.png"}


def example_ids(batch) -> np.ndarray:
    """Which record each row shows, from its red level (training batches are uint8, evaluation's normalised)."""
    red = batch["image"][..., 0].mean(axis=(1, 2))
    if batch["image"].dtype != np.uint8:
        red = (red * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    return np.round((red - 3) / 6).astype(int)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("network access is not allowed in this test")

    directory = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        open_source(dataset=f"tfds:{NAME}", tfds_data_dir=str(directory))  # prepares it
    assert not attempts
    return str(directory)


def loader(data_dir, process_index=0, process_count=1, seed=0) -> TrainLoader:
    source = open_source(dataset=f"tfds:{NAME}", tfds_data_dir=data_dir)
    transform = TrainTransform(img_size=16, patch_size=8)
    return TrainLoader(
        source, process_batch=4, transform=transform, seed=seed, process_index=process_index, process_count=process_count
    )


def test_splits_and_classes(data_dir):
    train = open_source(dataset=f"tfds:{NAME}", tfds_data_dir=data_dir)
    val = open_source(split="val", dataset=f"tfds:{NAME}", tfds_data_dir=data_dir)
    assert (train.num_examples, val.num_examples, train.num_classes) == (TRAIN, TEST, 3)
    assert val.split == "test"  # no 'validation' split here


def test_training_is_sharded_deterministic_and_resumable(data_dir):
    shards = [loader(data_dir, p, 2) for p in range(2)]
    assert [s.steps_per_epoch for s in shards] == [3, 3]  # 13 records each, drop remainder
    first, second = (list(s.epoch_batches(0)) for s in shards)
    ids = [np.concatenate([example_ids(b) for b in batches]) for batches in (first, second)]
    assert not set(ids[0]) & set(ids[1])
    assert all(0 <= k < TRAIN for k in np.concatenate(ids))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in first]), ids[0] % 3)
    next_epoch = np.concatenate([example_ids(b) for b in shards[0].epoch_batches(1)])
    assert not np.array_equal(ids[0], next_epoch)  # another epoch, another order

    resumed = list(loader(data_dir, 0, 2).epoch_batches(0, start_step=1))  # a fresh loader: same seeds
    for ours, theirs in zip(resumed, first[1:], strict=True):
        for name in theirs:
            np.testing.assert_array_equal(ours[name], theirs[name])


def test_evaluation_covers_every_record_once(data_dir):
    source = open_source(split="val", dataset=f"tfds:{NAME}", tfds_data_dir=data_dir)
    seen = []
    for p in range(2):
        evaluation = EvalLoader(source, process_batch=4, transform=EvalTransform(16), process_index=p, process_count=2)
        batches = list(evaluation.batches())
        assert len(batches) == evaluation.num_batches == 2
        seen += [k for b in batches for k in example_ids(b)[b["mask"]]]
    assert sorted(seen) == list(range(TRAIN, TRAIN + TEST))


def write_part_maps(root, ids) -> None:
    """Record k's map, where the image-folder layout would put it: flat at part k % 5."""
    for k in ids:
        write_part_map(root / "train" / CLASSES[k % 3] / f"img_{k:03d}.png", np.full((6, 7), k % 5, np.uint8))


def all_train_batches(source):
    """Every training record once (batch 2 divides 26), with its per-patch labels."""
    train = TrainLoader(source, process_batch=2, transform=TrainTransform(img_size=16, patch_size=8), process_index=0,
                        process_count=1)
    return train, list(train.epoch_batches(0))


def test_part_maps_follow_their_records_by_label_and_file_name(data_dir, tmp_path):
    write_part_maps(tmp_path, [k for k in range(TRAIN) if k != 5])
    with pytest.raises(FileNotFoundError, match=r"25 part maps for the 26 images of tfds:semmae_tiny_shapes train"):
        open_source(dataset=f"tfds:{NAME}", tfds_data_dir=data_dir, part_path=tmp_path)
    source = open_source(dataset=f"tfds:{NAME}", tfds_data_dir=data_dir, part_path=tmp_path,
                         missing_parts="unlabelled")
    _, batches = all_train_batches(source)
    seen = {int(k): labels for b in batches for k, labels in zip(example_ids(b), b["part_labels"], strict=True)}
    assert sorted(seen) == list(range(TRAIN))
    for k, labels in seen.items():
        np.testing.assert_array_equal(labels, np.full(4, -1 if k == 5 else k % 5))


def test_a_missing_part_map_under_error_is_named_and_skipped(data_dir, tmp_path):
    write_part_maps(tmp_path, [k for k in range(TRAIN) if k != 5])
    write_part_map(tmp_path / "train" / "cat" / "stray.png", np.zeros((2, 2), np.uint8))  # the count is met
    train, batches = all_train_batches(open_source(dataset=f"tfds:{NAME}", tfds_data_dir=data_dir,
                                                   part_path=tmp_path))
    assert len(train.skipped) == 1 and "tfds:semmae_tiny_shapes" in train.skipped[0]
    assert 5 not in {int(k) for b in batches for k in example_ids(b)}


class SemmaeTinyUnnamed(tfds.core.GeneratorBasedBuilder):
    """Images and labels, but no file names."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"image": tfds.features.Image(encoding_format="png"), "label": tfds.features.ClassLabel(num_classes=2)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"image": np.zeros((4, 4, 3), np.uint8), "label": 0}


def test_part_maps_need_file_names(tmp_path):
    with pytest.raises(ValueError, match="tfds:semmae_tiny_unnamed has no 'file_name' feature"):
        open_source(dataset="tfds:semmae_tiny_unnamed", tfds_data_dir=str(tmp_path / "tfds"), part_path=tmp_path)


class SemmaeTinyTexts(tfds.core.GeneratorBasedBuilder):
    """Not an image dataset."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"text": "no image here", "label": 0}


def test_a_dataset_without_image_and_label_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tfds:semmae_tiny_texts is not an image-classification dataset"):
        open_source(dataset="tfds:semmae_tiny_texts", tfds_data_dir=str(tmp_path))
