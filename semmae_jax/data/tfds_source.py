"""TFDS image-classification datasets as a pipeline source (`--dataset tfds:NAME`).

Any TFDS dataset with an 'image' (Image) and a 'label' (ClassLabel) feature works;
`imagenet2012` needs its archives in `<tfds_data_dir>/downloads/manual/` as TFDS
documents, and is prepared on first use (single-process runs only: several processes
preparing the same directory at once would collide).

Records are read still encoded (`SkipDecoding`): the pipeline decodes them with its
own transforms. Each process reads its own `tfds.even_splits` share. A training epoch
reads the share's files in an order seeded by (seed, epoch) through a seeded shuffle
buffer (TFDS records have no random access, so this replaces the image folders' full
permutation); resuming at step s reads, but does not decode, the records it skips.
"""

from __future__ import annotations

import dataclasses

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from semmae_jax.data.pipeline import hide_gpus_from_tf
from semmae_jax.data.sources import Shard, Stream, epoch_seed


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
    """One split of a prepared TFDS dataset."""

    name: str
    split: str  # TFDS's split name
    builder: tfds.core.DatasetBuilder
    shuffle_buffer: int = 10_000  # encoded records (ImageNet: ~110 kB each)

    @property
    def num_examples(self) -> int:
        return self.builder.info.splits[self.split].num_examples

    @property
    def num_classes(self) -> int:
        return self.builder.info.features["label"].num_classes

    def _share(self, shard: Shard, drop_remainder: bool) -> tuple[object, int]:
        share = tfds.even_splits(self.split, shard.count, drop_remainder=drop_remainder)[shard.index]
        return share, self.builder.info.splits[share].num_examples

    def steps_per_epoch(self, batch_size: int, shard: Shard) -> int:
        return self._share(shard, drop_remainder=True)[1] // batch_size

    def train_stream(self, epoch: int, seed: int, batch_size: int, shard: Shard, start_step: int) -> Stream:
        share, _ = self._share(shard, drop_remainder=True)
        length = self.steps_per_epoch(batch_size, shard) * batch_size
        order_seed = epoch_seed(seed, epoch)
        records = self._read(share, order_seed).shuffle(self.shuffle_buffer, seed=order_seed).take(length)
        return self._stream(records, length, start_step * batch_size, f"{share}, epoch {epoch}")

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
            return {"image": record["image"], "label": record["label"], "id": example_id, "pos": pos}

        refs = records.enumerate().skip(first_pos).map(ref)
        return Stream(refs, length, lambda pos: f"tfds:{self.name} {where}: record {pos} of this process's stream")

    def load(self, ref: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": ref["image"], "part": tf.constant(b""), "pil": tf.constant(False)}


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


def tfds_source(name: str, split: str, data_dir: str | None) -> TfdsSource:
    """Open (and if needed prepare) `name` from `data_dir`; `split` is 'train' or 'val'."""
    hide_gpus_from_tf()  # before TFDS runs the first TensorFlow op
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
    return TfdsSource(name, _split_name(name, builder, split), builder)
