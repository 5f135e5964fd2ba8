"""Packed datasets: an image folder (with its part maps) in a few large TFRecord files.

    python main.py prepare --data_path DIR [--part_path P] --out PACKED [--max_size N]

then every job reads `--data_path PACKED`. Millions of small files are slow to list,
copy and open on shared file systems; a packed copy is a few hundred files, and with
`--max_size` (FFCV's practice) its JPEGs are smaller and decode faster.

Layout of PACKED:

* `packed.json`: the index, {'format', 'max_size', 'splits': {split: {'classes',
  'count', 'with_part_map', 'shards': [{'file', 'count'}]}}}.
* `<split>-NNNNN-of-MMMMM.tfrecord`: standard TFRecord files of `tf.train.Example`s
  {'image': encoded bytes, 'label': int64, 'file_name': path under the split,
  'part': part-map PNG bytes or b''}, in torchvision's listing order.
* `<split>.records.npz`: per record its shard, byte offset, length, label and file
  name, so that any record is read directly (`os.pread`), without scanning.

The reader (`PackedSource`) is an `IndexedSource` like the image folder: example k is
the folder's example k, so a (seed, epoch) gives the same order, the same process
shares, the same augmentation seeds and the same exact resume as the folder it was
made from; only the bytes come from elsewhere (and are re-encoded under `--max_size`).
The part maps travel inside: a job reads them without `--part_path`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from semmae_jax.data.bands import NPY_MAGIC, TIFF_MAGIC
from semmae_jax.data.sources import (
    IMG_EXTENSIONS,
    FolderSource,
    IndexedSource,
    MissingParts,
    image_folder,
    needs_pil,
    split_dir,
)
from semmae_jax.data.tf_runtime import tf

FORMAT = "semmae-packed-v1"
RECORD_HEADER = 12  # TFRecord framing: uint64 length + uint32 CRC before the data, uint32 CRC after
RECORD_FOOTER = 4
FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "file_name": tf.io.FixedLenFeature([], tf.string),
    "part": tf.io.FixedLenFeature([], tf.string),
}

PACKED_INDEX = "packed.json"  # the index file that marks a `--data_path` as packed


# ---------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True, eq=False)
class PackedSource(IndexedSource):
    """One split of a packed dataset (see the module's docstring)."""

    root: Path
    classes: tuple[str, ...]
    shard_files: tuple[str, ...]
    shards: np.ndarray  # int32 [N]: the file of each record
    offsets: np.ndarray  # int64 [N]: where its serialized Example starts
    lengths: np.ndarray  # int64 [N]
    labels: np.ndarray  # int64 [N]
    names: np.ndarray  # str [N]: file name under the split's folder
    _fds: dict[int, int] = dataclasses.field(default_factory=dict, repr=False)

    def _columns(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "shard": self.shards[ids],
            "offset": self.offsets[ids],
            "length": self.lengths[ids],
            "label": self.labels[ids],
        }

    def _name(self, example_id: int) -> str:
        return f"{self.root}: {self.names[example_id]}"

    def _read(self, shard: np.ndarray, offset: np.ndarray, length: np.ndarray) -> np.ndarray:
        """One serialized Example (os.pread: thread-safe, releases the GIL while reading)."""
        shard = int(shard)
        fd = self._fds.get(shard)
        if fd is None:  # first read of this file (threads racing here keep one descriptor)
            fd = os.open(self.root / self.shard_files[shard], os.O_RDONLY)
            if self._fds.setdefault(shard, fd) != fd:
                os.close(fd)
                fd = self._fds[shard]
        data = os.pread(fd, int(length), int(offset))
        if len(data) != length:
            raise ValueError(f"{self.root / self.shard_files[shard]} is truncated at byte {offset}")
        return np.array(data, dtype=object)  # an object array keeps trailing NUL bytes

    def load(self, ref: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        serialized = tf.numpy_function(
            self._read, [ref["shard"], ref["offset"], ref["length"]], tf.string, stateful=False
        )
        record = tf.io.parse_single_example(tf.ensure_shape(serialized, []), FEATURES)
        pil = tf.logical_and(needs_pil(record["file_name"]), tf.logical_not(tf.io.is_jpeg(record["image"])))
        return {"image": record["image"], "part": record["part"], "pil": pil}


def read_index(root: str | Path) -> dict:
    """The parsed `packed.json` of `root`, checked; a clear error for a damaged one."""
    path = Path(root) / PACKED_INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--data_path: {path} is not a readable packed-dataset index: {error}") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("splits"), dict):
        raise ValueError(f"--data_path: {path} is not a {FORMAT} index (made by `main.py prepare`)")
    return index


def packed_source(root: str | Path, split: str = "train", part_path: str | Path | None = None) -> PackedSource:
    """Open `split` of the packed dataset at `root` (`--data_path PACKED`)."""
    root = Path(root)
    if part_path is not None:
        raise ValueError(
            f"--part_path: {root} is a packed dataset, which carries its part maps inside "
            "(pack them with `main.py prepare --part_path`); drop --part_path"
        )
    splits = read_index(root)["splits"]
    if split not in splits:
        raise FileNotFoundError(f"--data_path {root}: the packed dataset has no {split!r} split (it has {list(splits)})")
    entry = splits[split]
    try:
        with np.load(root / f"{split}.records.npz") as records:
            columns = {name: records[name] for name in ("shards", "offsets", "lengths", "labels", "names")}
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"--data_path: {root / f'{split}.records.npz'} is missing or damaged: {error}") from error
    if len(columns["labels"]) != entry["count"]:
        raise ValueError(f"--data_path: {root}: {split}.records.npz lists {len(columns['labels'])} records, "
                         f"{PACKED_INDEX} says {entry['count']}")
    return PackedSource(
        root=root,
        classes=tuple(entry["classes"]),
        shard_files=tuple(shard["file"] for shard in entry["shards"]),
        **columns,
    )


# ---------------------------------------------------------------------------- writing


def shrink_jpeg(data: bytes, max_size: int | None, quality: int) -> bytes:
    """`data` itself, or re-encoded as a JPEG with its longer side `max_size` (bicubic, as PIL) if longer;
    only 8-bit RGB or grey images (a JPEG holds nothing else: 16-bit or N-band images stay as they are)."""
    if max_size is None or data[:4] in TIFF_MAGIC or data[:6] == NPY_MAGIC:
        return data
    with Image.open(io.BytesIO(data)) as image:
        if max(image.size) <= max_size or image.mode not in ("RGB", "L", "P", "CMYK", "YCbCr"):
            return data
        scale = max_size / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        small = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _example(image: bytes, label: int, file_name: str, part: bytes) -> bytes:
    def feature(value: bytes | int) -> tf.train.Feature:
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {"image": image, "label": label, "file_name": file_name.encode(), "part": part}
    return tf.train.Example(
        features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})
    ).SerializeToString()


def _read_bytes(path: str) -> bytes:
    return Path(path).read_bytes() if path else b""


def _encoded(source: FolderSource, max_size: int | None, quality: int, workers: int) -> Iterator[bytes]:
    """Serialized Examples of `source` (an image folder) in listing order; files read and shrunk in threads."""

    def one(k: int) -> bytes:
        image = shrink_jpeg(_read_bytes(source.paths[k]), max_size, quality)
        name = Path(source.paths[k]).relative_to(source.root).as_posix()
        return _example(image, int(source.labels[k]), name, _read_bytes(source.part_paths[k]))

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        yield from pool.map(one, range(source.num_examples), chunksize=16)


def write_split(
    source: FolderSource, out: Path, split: str, images_per_shard: int, max_size: int | None, quality: int
) -> dict:
    """Write one split's shards and `<split>.records.npz`; its entry of the index."""
    count = source.num_examples
    num_shards = max(1, -(-count // images_per_shard))
    files = [f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    shards, offsets, lengths = np.zeros(count, np.int32), np.zeros(count, np.int64), np.zeros(count, np.int64)
    records = _encoded(source, max_size, quality, os.cpu_count() or 1)
    for shard, name in enumerate(files):
        position = 0
        with tf.io.TFRecordWriter(str(out / name)) as writer:
            for k in range(shard * images_per_shard, min(count, (shard + 1) * images_per_shard)):
                record = next(records)
                writer.write(record)
                shards[k], offsets[k], lengths[k] = shard, position + RECORD_HEADER, len(record)
                position += RECORD_HEADER + len(record) + RECORD_FOOTER
    names = [Path(p).relative_to(source.root).as_posix() for p in source.paths]
    np.savez(out / f"{split}.records.npz", shards=shards, offsets=offsets, lengths=lengths,
             labels=source.labels, names=np.asarray(names, dtype=str))
    sizes = [min(images_per_shard, count - i * images_per_shard) for i in range(num_shards)]
    return {
        "classes": list(source.classes),
        "count": count,
        "with_part_map": int(sum(bool(p) for p in source.part_paths)),
        "shards": [{"file": f, "count": n} for f, n in zip(files, sizes, strict=True)],
    }


def prepare(
    data_path: str | Path,
    out: str | Path,
    part_path: str | Path | None = None,
    max_size: int | None = None,
    images_per_shard: int = 1024,
    quality: int = 90,
    missing_parts: MissingParts = "error",
    extensions: tuple[str, ...] = IMG_EXTENSIONS,
) -> dict:
    """Pack the train (and val, if present) split of an image folder into `out`; returns the index.
    `extensions`: the files that are images (`sources.BAND_EXTENSIONS` for images of other bands).

    The index is written last, so an interrupted run leaves no `packed.json` and is
    never read as a dataset.
    """
    out = Path(out)
    if (out / PACKED_INDEX).exists():
        raise FileExistsError(f"--out {out} already holds a packed dataset ({PACKED_INDEX}); choose another --out")
    if max_size is not None and max_size < 1:
        raise ValueError(f"--max_size must be a positive number of pixels, got {max_size}")
    if images_per_shard < 1:
        raise ValueError(f"--images_per_shard must be positive, got {images_per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in ("train", "val"):
        if split == "val" and not (Path(data_path) / "val").is_dir():
            continue
        split_dir(data_path, split)  # the clear error for a missing train/ folder
        source = image_folder(data_path, split, part_path, missing_parts, extensions)
        splits[split] = write_split(source, out, split, images_per_shard, max_size, quality)
    index = {"format": FORMAT, "max_size": max_size, "splits": splits}
    (out / PACKED_INDEX).write_text(json.dumps(index, indent=1))
    return index
