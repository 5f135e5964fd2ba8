"""The tf.data pipeline: sharding over processes, exact resume, determinism, unreadable
images, evaluation padding, the `pretrain_batches` contract and global arrays.

The red channel of every test image is flat and encodes its file index, so the batches
say which file sits in which slot whatever the crop and flip.
"""

import jax
import numpy as np
import pytest
from data_helpers import pretrain_batches
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from semmae_jax.data.global_arrays import global_batch, prefetch_to_device
from semmae_jax.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from semmae_jax.data.part_maps import write_part_map
from semmae_jax.data.pipeline import EvalLoader, TrainLoader
from semmae_jax.data.sources import image_folder
from semmae_jax.data.transforms import EvalTransform, TrainTransform, normalize

TRANSFORM = TrainTransform(img_size=16, patch_size=8)


def identity_folder(root, count: int, num_classes: int = 3) -> list:
    """`count` PNGs over `num_classes` classes, red flat at 8 * index + 4 (green is noise, so
    that crops and flips show); their paths by index."""
    paths, rng = [], np.random.default_rng(0)
    for k in range(count):
        path = root / "train" / f"class{k % num_classes}" / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (20 + 4 * (k % 3), 26 - 3 * (k % 2))
        pixels = np.full((*size, 3), (8 * k + 4, 0, 200), np.uint8)
        pixels[..., 1] = rng.integers(0, 256, size)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def file_ids(batch) -> np.ndarray:
    """Which file each row shows, from its red level (training batches are uint8, evaluation's normalised)."""
    red = batch["image"][..., 0].mean(axis=(1, 2))
    if batch["image"].dtype != np.uint8:
        red = (red * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    return np.round((red - 4) / 8).astype(int)


def train_loader(root, batch_size, **kwargs) -> TrainLoader:
    options = {"process_index": 0, "process_count": 1, "transform": TRANSFORM, **kwargs}
    return TrainLoader(image_folder(root), process_batch=batch_size, **options)


def assert_same_batches(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


# ---------------------------------------------------------------- multi-process


@pytest.mark.parametrize("count", [24, 27])
def test_processes_read_disjoint_shares_of_each_global_batch(tmp_path, count):
    identity_folder(tmp_path, count)
    shards = [train_loader(tmp_path, 3, process_index=p, process_count=2) for p in range(2)]
    whole = train_loader(tmp_path, 6)  # one process holding the global batch
    assert shards[0].steps_per_epoch == shards[1].steps_per_epoch == whole.steps_per_epoch == 4
    seen = []
    for first, second, together in zip(*(s.epoch_batches(0) for s in shards), whole.epoch_batches(0), strict=True):
        ids = [file_ids(first), file_ids(second)]
        assert not set(ids[0]) & set(ids[1])
        np.testing.assert_array_equal(np.concatenate(ids), file_ids(together))
        np.testing.assert_array_equal(np.concatenate([first["image"], second["image"]]), together["image"])
        seen += [*ids[0], *ids[1]]
    assert len(set(seen)) == 24  # every file once; 27 files drop the remainder of 3
    if count == 24:
        assert sorted(seen) == list(range(24))


@pytest.mark.parametrize("count,process_count", [(25, 2), (25, 3), (7, 2)])
def test_eval_covers_every_image_once_and_masks_the_padding(tmp_path, count, process_count):
    identity_folder(tmp_path, count)
    source = image_folder(tmp_path)
    seen, lengths = [], set()
    for p in range(process_count):
        loader = EvalLoader(
            source, process_batch=4, transform=EvalTransform(16), process_index=p, process_count=process_count
        )
        batches = list(loader.batches())
        lengths.add((loader.num_batches, len(batches)))
        for batch in batches:
            assert batch["mask"].dtype == bool and batch["image"].shape == (4, 16, 16, 3)
            seen += list(file_ids(batch)[batch["mask"]])
            assert (batch["label"][~batch["mask"]] == -1).all()
    assert len(lengths) == 1 and len(set(next(iter(lengths)))) == 1  # the same batch count everywhere
    assert sorted(seen) == list(range(count))


# ---------------------------------------------------------- order and resume


def test_resume_gives_the_rest_of_the_epoch_without_reading_what_it_skips(tmp_path):
    paths = identity_folder(tmp_path, 20)
    loader = train_loader(tmp_path, 4)
    full = list(loader.epoch_batches(1))
    for batch in full[:2]:  # the images of the steps a resume skips: gone
        for k in file_ids(batch):
            paths[k].unlink()
    resumed = list(loader.epoch_batches(1, start_step=2))  # the listing from before the deletion
    assert_same_batches(resumed, full[2:])
    assert not loader.skipped
    stream = loader.source.train_stream(1, loader.seed, 4, loader.shard, start_step=2)
    assert [int(ref["pos"]) for ref in stream.refs] == list(range(8, 20))  # nothing before step 2 is even listed


def test_same_seed_same_batches_whatever_the_parallelism(tmp_path):
    identity_folder(tmp_path, 16)
    serial = list(train_loader(tmp_path, 4, num_workers=1, seed=3).epoch_batches(2))
    parallel = list(train_loader(tmp_path, 4, num_workers=4, seed=3).epoch_batches(2))
    assert_same_batches(serial, parallel)
    other_seed = list(train_loader(tmp_path, 4, seed=4).epoch_batches(2))
    other_epoch = list(train_loader(tmp_path, 4, seed=3).epoch_batches(3))
    order = np.concatenate([file_ids(b) for b in serial])
    assert sorted(order) == list(range(16))
    for other in (other_seed, other_epoch):
        assert not np.array_equal(order, np.concatenate([file_ids(b) for b in other]))


# -------------------------------------------------------------- unreadable images


def test_corrupt_images_are_named_counted_and_replaced_within_their_batch(tmp_path):
    paths = identity_folder(tmp_path, 12)
    clean = list(train_loader(tmp_path, 4).epoch_batches(0))
    paths[3].write_bytes(b"this is not an image")
    paths[7].write_bytes(paths[7].read_bytes()[:40])  # truncated PNG
    loader = train_loader(tmp_path, 4)
    damaged = list(loader.epoch_batches(0))
    assert sorted(loader.skipped) == [str(paths[3]), str(paths[7])]
    assert len(damaged) == len(clean) == loader.steps_per_epoch
    for before, after in zip(clean, damaged, strict=True):
        ids_before, ids_after = file_ids(before), file_ids(after)
        assert not {3, 7} & set(ids_after)
        kept = ~np.isin(ids_before, [3, 7])
        np.testing.assert_array_equal(ids_after[kept], ids_before[kept])  # everything else in its slot
        assert set(ids_after[~kept]) <= set(ids_before[kept])  # gaps filled from the same batch

    evaluation = EvalLoader(
        image_folder(tmp_path), process_batch=5, transform=EvalTransform(16), process_index=0, process_count=1
    )
    real = [k for batch in evaluation.batches() for k in file_ids(batch)[batch["mask"]]]
    assert sorted(real) == sorted(set(range(12)) - {3, 7})
    assert sorted(evaluation.skipped) == [str(paths[3]), str(paths[7])]


def test_images_without_part_maps_are_unlabelled_when_allowed(tmp_path):
    paths = identity_folder(tmp_path, 8)
    for k, path in enumerate(paths):
        if k % 4:  # images 0 and 4 have no map
            write_part_map(
                tmp_path / "parts" / path.relative_to(tmp_path).with_suffix(".png"), np.full((8, 8), 2, np.uint8)
            )
    source = image_folder(tmp_path, part_path=tmp_path / "parts", missing_parts="unlabelled")
    assert len(source.missing_parts) == 2
    loader = TrainLoader(source, process_batch=4, transform=TRANSFORM, process_index=0, process_count=1)
    for batch in loader.epoch_batches(0):
        for k, labels in zip(file_ids(batch), batch["part_labels"], strict=True):
            assert (labels == (-1 if k % 4 == 0 else 2)).all()


# --------------------------------------------------------------------- contract


def test_pretrain_batches_contract(tmp_path):
    paths = identity_folder(tmp_path, 6)
    for path in paths:
        write_part_map(
            tmp_path / "parts" / path.relative_to(tmp_path).with_suffix(".png"), np.full((5, 5), 1, np.uint8)
        )
    batches = pretrain_batches(str(tmp_path), str(tmp_path / "parts"), batch_size=4, img_size=16, patch_size=4)
    for _ in range(3):  # one step per epoch: endless, epoch after epoch
        batch = next(batches)
        assert set(batch) == {"image", "part_labels"}
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["part_labels"].shape == (4, 16) and batch["part_labels"].dtype == np.int32
        assert (batch["part_labels"] == 1).all()
    unlabelled = next(pretrain_batches(str(tmp_path), batch_size=2, img_size=16, patch_size=8))
    assert (unlabelled["part_labels"] == -1).all()


def test_loader_arguments_are_checked(tmp_path):
    identity_folder(tmp_path, 5)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        train_loader(tmp_path, 3, process_count=2)
    with pytest.raises(ValueError, match="process_index 2"):
        train_loader(tmp_path, 1, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="start_step 6"):
        next(train_loader(tmp_path, 1).epoch_batches(0, start_step=6))


# ----------------------------------------------------------------- global arrays


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))


def local_batches(count: int):
    for k in range(count):
        yield {"image": np.arange(8 * 12, dtype=np.float32).reshape(8, 2, 2, 3) + k, "label": np.arange(8) + 10 * k}


def test_global_batch_is_sharded_over_the_batch_axes(mesh):
    batch = next(local_batches(1))
    arrays = global_batch(batch, mesh)
    for name, array in arrays.items():
        assert array.sharding == NamedSharding(mesh, P(("data", "fsdp")))
        assert [shard.data.shape[0] for shard in array.addressable_shards] == [1] * 8
        np.testing.assert_array_equal(np.asarray(array), batch[name])


def test_prefetch_to_device_keeps_order_and_two_batches_ahead(mesh):
    pulled = []

    def counted(count):
        for batch in local_batches(count):
            pulled.append(batch)
            yield batch

    prefetched = prefetch_to_device(counted(5), mesh, size=2)
    first = next(prefetched)
    assert len(pulled) == 3  # the one handed out and two more in flight
    rest = list(prefetched)
    for ours, theirs in zip([first, *rest], local_batches(5), strict=True):
        np.testing.assert_array_equal(np.asarray(ours["label"]), theirs["label"])
    assert list(prefetch_to_device(counted(1), mesh)) and len(pulled) == 6


def test_prefetch_to_device_normalises_uint8_images_on_the_devices_as_the_host_would(mesh):
    """Training batches travel as uint8; on the devices they must equal the host's normalisation (`normalize`)."""
    pixels = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    floats = np.random.default_rng(1).normal(size=(8, 2, 2, 3)).astype(np.float32)
    batches = list(prefetch_to_device(iter([{"image": pixels, "label": np.arange(8)}, {"image": floats}]), mesh))
    uint8_batch, float_batch = batches
    assert uint8_batch["image"].dtype == np.float32
    assert uint8_batch["image"].sharding == NamedSharding(mesh, P(("data", "fsdp")))
    np.testing.assert_allclose(np.asarray(uint8_batch["image"]), normalize(pixels).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(uint8_batch["label"]), np.arange(8))
    np.testing.assert_array_equal(np.asarray(float_batch["image"]), floats)  # already normalised: left as it is
