"""TFDS image-classification datasets as a pipeline source (`--dataset tfds:NAME`).

Any TFDS dataset with an 'image' (Image) and a 'label' (ClassLabel) feature works;
`imagenet2012` needs its archives in `<tfds_data_dir>/downloads/manual/` as TFDS
documents, and is prepared on first use (single-process runs only: several processes
preparing the same directory at once would collide).

Part maps (`--part_path`) are keyed by label name and file name, so that a part-map tree
made for the image-folder layout serves the same images read through TFDS: the record
with label `n01440764` and `file_name` `n01440764_10026.JPEG` of the train split takes
`PART_DIR/train/n01440764/n01440764_10026.png` (the validation split: `PART_DIR/val/...`).
This needs a `file_name` feature, which `imagenet2012` has.

Records are read still encoded (`SkipDecoding`): the pipeline decodes them with its
own transforms. Each process reads its own `tfds.even_splits` share. A training epoch
reads the share's files in an order seeded by (seed, epoch) through a seeded shuffle
buffer (TFDS records have no random access, so this replaces the image folders' full
permutation); resuming at step s reads, but does not decode, the records it skips.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import tensorflow_datasets as tfds

from semmae_jax.data.sources import MissingParts, Shard, Stream, epoch_seed, read_part_map_bytes
from semmae_jax.data.tf_runtime import tf


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
    """One split of a prepared TFDS dataset."""

    name: str
    split: str  # TFDS's split name
    builder: tfds.core.DatasetBuilder
    shuffle_buffer: int = 10_000  # encoded records (ImageNet: ~110 kB each)
    # '<label name>/<file stem>' -> part-map file; its default is what a record without one gets
    part_maps: tf.lookup.StaticHashTable | None = None

    @property
    def num_examples(self) -> int:
        return self.builder.info.splits[self.split].num_examples

    @property
    def num_classes(self) -> int:
        return self.builder.info.features["label"].num_classes

    def _share(self, shard: Shard, drop_remainder: bool) -> tuple[object, int]:
        share = tfds.even_splits(self.split, shard.count, drop_remainder=drop_remainder)[shard.index]
        return share, self.builder.info.splits[share].num_examples

    def steps_per_epoch(self, process_batch: int, shard: Shard) -> int:
        return self._share(shard, drop_remainder=True)[1] // process_batch

    def train_stream(self, epoch: int, seed: int, process_batch: int, shard: Shard, start_step: int) -> Stream:
        share, _ = self._share(shard, drop_remainder=True)
        length = self.steps_per_epoch(process_batch, shard) * process_batch
        order_seed = epoch_seed(seed, epoch)
        records = self._read(share, order_seed).shuffle(self.shuffle_buffer, seed=order_seed).take(length)
        return self._stream(records, length, start_step * process_batch, f"{share}, epoch {epoch}")

    def eval_stream(self, shard: Shard) -> Stream:
        share, size = self._share(shard, drop_remainder=False)
        return self._stream(self._read(share, None), size, 0, str(share))

    def _read(self, share: object, shuffle_seed: int | None) -> tf.data.Dataset:
        return self.builder.as_dataset(
            split=share,
            shuffle_files=shuffle_seed is not None,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(add_tfds_id=True, shuffle_seed=shuffle_seed),
        )

    def _stream(self, records: tf.data.Dataset, length: int, first_pos: int, where: str) -> Stream:
        def ref(pos: tf.Tensor, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            # The record's stable id seeds its augmentation, whatever order it is read in.
            example_id = tf.strings.to_hash_bucket_fast(record["tfds_id"], 2**62)
            part = self._part_map(record) if self.part_maps is not None else tf.constant("")
            return {"image": record["image"], "part": part, "label": record["label"], "id": example_id, "pos": pos}

        refs = records.enumerate().skip(first_pos).map(ref)
        return Stream(refs, length, lambda pos: f"tfds:{self.name} {where}: record {pos} of this process's stream")

    def _part_map(self, record: dict[str, tf.Tensor]) -> tf.Tensor:
        label = tf.gather(tf.constant(self.builder.info.features["label"].names), record["label"])
        stem = tf.strings.regex_replace(tf.strings.regex_replace(record["file_name"], r"^.*/", ""), r"\.[^.]*$", "")
        return self.part_maps.lookup(tf.strings.join([label, stem], "/"))

    def load(self, ref: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": ref["image"], "part": read_part_map_bytes(ref["part"]), "pil": tf.constant(False)}


def part_map_table(part_root: Path, num_examples: int, missing: MissingParts, where: str) -> tf.lookup.StaticHashTable:
    """'<label name>/<file stem>' -> part-map path for the PNGs under `part_root` (one split's tree).

    Whether every record has its map is only known while reading (TFDS has no cheap
    listing of file names): under 'error' fewer maps than records is refused at once, and
    a record whose map is missing fails to load, so it is named and skipped like an
    unreadable image; under 'unlabelled' it trains with every patch unlabelled.
    """
    if not part_root.is_dir():
        raise FileNotFoundError(f"--part_path: no folder {part_root} for {where}")
    keys, paths = [], []
    for folder, _, files in os.walk(part_root, followlinks=True):
        for name in files:
            if name.endswith(".png"):
                keys.append(f"{Path(folder).relative_to(part_root).as_posix()}/{name[:-4]}")
                paths.append(os.path.join(folder, name))
    if missing == "error" and len(keys) < num_examples:
        raise FileNotFoundError(
            f"--part_path {part_root}: {len(keys)} part maps for the {num_examples} images of {where} "
            "(expected <label name>/<file name stem>.png for each; use --missing_part_map unlabelled to train "
            "images without one with every patch unlabelled)"
        )
    default = str(part_root / "<no part map>") if missing == "error" else ""
    initializer = tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.string), tf.constant(paths, tf.string))
    return tf.lookup.StaticHashTable(initializer, default_value=default)


def _check_features(name: str, builder: tfds.core.DatasetBuilder) -> None:
    features = dict(builder.info.features.items())
    image, label = features.get("image"), features.get("label")
    if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(
            f"tfds:{name} is not an image-classification dataset with 'image' (Image) and 'label' "
            f"(ClassLabel) features; it has: {features}"
        )


def _split_name(name: str, builder: tfds.core.DatasetBuilder, split: str) -> str:
    available = list(builder.info.splits)
    wanted = {"train": ["train"], "val": ["validation", "test"]}.get(split, [split])
    for candidate in wanted:
        if candidate in available:
            return candidate
    raise ValueError(f"tfds:{name} has no {' or '.join(wanted)} split (it has {available})")


def tfds_source(
    name: str, split: str, data_dir: str | None, part_path: str | Path | None = None, missing_parts: MissingParts = "error"
) -> TfdsSource:
    """Open (and if needed prepare) `name` from `data_dir`; `split` is 'train' or 'val'.

    With `part_path`, records take their part maps from `part_path/split/` (see the
    module's docstring); `missing_parts` as for image folders.
    """
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if jax.process_count() > 1:
            raise RuntimeError(
                f"tfds:{name} is not prepared in {builder.data_dir}; prepare it once before a multi-process run "
                f"(`tfds build {name} --data_dir {data_dir}`, ImageNet's archives in <data_dir>/downloads/manual/)"
            )
        # No pre-built copy from Google's bucket: the data comes from the manual dir or the dataset's own URLs.
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    _check_features(name, builder)
    source = TfdsSource(name, _split_name(name, builder, split), builder)
    if part_path is None:
        return source
    if "file_name" not in builder.info.features:
        raise ValueError(f"--part_path: tfds:{name} has no 'file_name' feature to find each image's part map by")
    table = part_map_table(Path(part_path) / split, source.num_examples, missing_parts, f"tfds:{name} {source.split}")
    return dataclasses.replace(source, part_maps=table)
