"""Packed datasets (`main.py prepare`): the same batches as the image folder they were made from
(images, labels, part maps, process shares, evaluation), exact resume, `--max_size`, bad input."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from semmae_jax.data import packed
from semmae_jax.data.datasets import open_source
from semmae_jax.data.part_maps import write_part_map
from semmae_jax.data.pipeline import EvalLoader, TrainLoader
from semmae_jax.data.sources import Shard
from semmae_jax.data.tf_runtime import tf
from semmae_jax.data.transforms import EvalTransform, TrainTransform
from semmae_jax.jobs import prepare as prepare_job

TRANSFORM = TrainTransform(img_size=32, patch_size=8)


def write_folder(root, count: int = 30) -> None:
    """JPEGs and PNGs of varied sizes over 3 classes, a part map for each (varied per image), a val split."""
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", 7)):
        for k in range(n):
            size = (40 + 7 * (k % 4), 50 + 5 * (k % 3))
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            suffix = ".png" if k % 5 == 0 else ".jpg"
            path = root / split / f"class{k % 3}" / f"{k:03d}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            part = rng.integers(0, 4, (size[0] // 2, size[1] // 2)).astype(np.uint8)
            write_part_map(root / "parts" / split / f"class{k % 3}" / f"{k:03d}.png", part)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_folder(root)
    out = root.parent / f"{root.name}-packed"
    packed.prepare(root, out, part_path=root / "parts", images_per_shard=8)
    return root, out


def batches(source, epoch=1, start_step=0, **kwargs):
    options = {"process_index": 0, "process_count": 1, **kwargs}
    loader = TrainLoader(source, process_batch=4, transform=TRANSFORM, seed=5, **options)
    return list(loader.epoch_batches(epoch, start_step))


def assert_same(ours, theirs):
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_packed_data_gives_the_folders_batches_images_labels_and_part_maps(folders):
    root, out = folders
    folder = open_source(root, part_path=root / "parts")
    source = open_source(out)  # recognised by its index file
    assert isinstance(source, packed.PackedSource) and source.classes == folder.classes
    theirs, ours = batches(folder), batches(source)
    assert_same(ours, theirs)
    assert (np.concatenate([b["part_labels"] for b in ours]) >= 0).all()  # the part maps did travel
    assert len(ours) == 7 and len(np.unique(np.concatenate([b["label"] for b in ours]))) == 3


def test_packed_process_shares_and_evaluation_match_the_folder(folders):
    root, out = folders
    for p in range(2):
        shard = {"process_index": p, "process_count": 2}
        assert_same(batches(open_source(out), epoch=0, **shard),
                    batches(open_source(root, part_path=root / "parts"), epoch=0, **shard))
    evaluated = []
    for source in (open_source(root, "val"), open_source(out, "val")):
        loader = EvalLoader(source, process_batch=4, transform=EvalTransform(32), process_index=0, process_count=1)
        evaluated.append(list(loader.batches()))
    assert_same(*evaluated)


def test_resume_mid_epoch_on_packed_data_reproduces_the_batches(folders):
    _, out = folders
    source = open_source(out)
    full = batches(source, epoch=2)
    resumed = batches(source, epoch=2, start_step=3)
    assert_same(resumed, full[3:])
    stream = source.train_stream(2, 5, 4, Shard(0, 1), 3)
    assert [int(ref["pos"]) for ref in stream.refs] == list(range(12, 28))  # nothing before step 3 is read


def test_max_size_reencodes_large_images_and_keeps_the_rest(folders, tmp_path):
    root, _ = folders
    out = tmp_path / "small"
    index = packed.prepare(root, out, max_size=56)
    assert index["max_size"] == 56 and index["splits"]["train"]["with_part_map"] == 0
    source = packed.packed_source(out)
    sizes = []
    for k in range(source.num_examples):
        example = source._read(source.shards[k], source.offsets[k], source.lengths[k]).item()
        image = tf.io.parse_single_example(example, packed.FEATURES)["image"].numpy()
        with Image.open(io.BytesIO(image)) as decoded:
            sizes.append(max(decoded.size))
            original = Image.open(root / "train" / source.names[k])
            if max(original.size) <= 56:
                assert image == (root / "train" / source.names[k]).read_bytes()  # small ones: the same bytes
            else:
                assert decoded.format == "JPEG" and max(decoded.size) == 56
    assert max(sizes) == 56 and min(sizes) < 56


def test_prepare_time_and_index_are_reported(folders, tmp_path, capsys):
    root, _ = folders
    prepare_job.main(["--data_path", str(root), "--out", str(tmp_path / "p"), "--images_per_shard", "16"])
    printed = capsys.readouterr().out
    assert "train: 30 images in 2 shards" in printed and "val: 7 images in 1 shards" in printed
    index = json.loads((tmp_path / "p" / "packed.json").read_text())
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [16, 14]


def test_bad_packed_input_gets_one_clear_line(folders, tmp_path):
    root, out = folders
    with pytest.raises(ValueError, match=r"--part_path: .* packed dataset"):
        open_source(out, part_path=root / "parts")
    with pytest.raises(FileExistsError, match=r"--out .* already holds a packed dataset"):
        packed.prepare(root, out)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "packed.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"packed\.json is not a readable packed-dataset index"):
        open_source(broken)
    (broken / "packed.json").write_text(json.dumps({"format": packed.FORMAT, "splits": {"train": {"count": 3}}}))
    with pytest.raises(ValueError, match=r"train\.records\.npz is missing or damaged"):
        open_source(broken)
    with pytest.raises(SystemExit):
        prepare_job.main(["--data_path", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
