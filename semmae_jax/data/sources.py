"""Where examples come from: image folders in the original's layout, packed data, or TFDS.

A source knows its examples and the order they are read in; the transforms and the
batching are the pipeline's (`pipeline.py`). Every kind hands the pipeline a `Stream`:
a tf.data dataset of cheap *references* (a path, a record's place in a packed shard
(`packed.py`, ordered as its image folder), or TFDS's still-encoded bytes) in the
order one process reads them, plus a way to name an element for error messages.

Image folders (`--data_path DIR`): `DIR/train/<class>/...`, `DIR/val/<class>/...`.
Classes and files are listed exactly as torchvision's `ImageFolder` does (class folders
`sorted` by name, files found recursively and sorted, the same extensions), so label
ids match checkpoints trained in PyTorch. A class folder with no image is an error, as
in `ImageFolder`: skipping it would silently shift no ids but would hide a broken copy.
A folder of images with no class folder (`DIR/<image>`, or `DIR/train/<image>`) is
unlabelled: every label is `NO_LABEL`, enough to pretrain; the commands that need labels
ask for them (`open_source(..., labelled=True)`).

Training order (image folders): the whole file list is shuffled per epoch by numpy
seeded with (seed, epoch); the first `steps * global_batch` files are used (drop
remainder) and global batch k is split across processes in process order, so that
process p holds rows [p * B, (p + 1) * B) of every global batch. Evaluation: each
process reads a contiguous, near-equal share of the files in listing order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np

from semmae_jax.data.part_maps import part_map_path
from semmae_jax.data.tf_runtime import tf

log = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Where images of other bands are read (`bands.py`), numpy arrays too; torchvision's list elsewhere.
BAND_EXTENSIONS = (*IMG_EXTENSIONS, ".npy")
_PIL_ONLY_PATTERN = r".*\.(ppm|pgm|tiff?)"  # formats tf.io cannot decode: PIL decodes them
NO_LABEL = -1  # the label of an image in a folder without class folders
MissingParts = Literal["error", "unlabelled"]


class Shard(NamedTuple):
    """This process's place among the processes that read one dataset."""

    index: int
    count: int


class Stream(NamedTuple):
    """References one process reads, in order, each with a 'pos' (its place in the stream).

    `length` counts the real elements (an evaluation stream is padded after them by the
    pipeline); `name(pos)` says which example a position holds, for error messages.
    """

    refs: tf.data.Dataset
    length: int
    name: Callable[[int], str]


class Source(Protocol):
    """What the pipeline needs from a dataset (`FolderSource`, `TfdsSource`)."""

    num_examples: int
    num_classes: int

    def steps_per_epoch(self, process_batch: int, shard: Shard) -> int: ...

    def train_stream(self, epoch: int, seed: int, process_batch: int, shard: Shard, start_step: int) -> Stream: ...

    def eval_stream(self, shard: Shard) -> Stream: ...

    def load(self, ref: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Graph op: a reference -> raw example {'image': bytes, 'part': bytes, 'pil': bool}."""
        ...


def epoch_seed(seed: int, epoch: int) -> int:
    """One 32-bit seed for (seed, epoch), for numpy and tf.data shuffles."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def eval_share(num_examples: int, shard: Shard) -> tuple[int, int]:
    """[start, stop) of this process's evaluation share: contiguous, sizes differing by at most 1."""
    base, extra = divmod(num_examples, shard.count)
    start = shard.index * base + min(shard.index, extra)
    return start, start + base + (shard.index < extra)


# --------------------------------------------------------------------- image folders


def find_classes(directory: str | Path, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[str]:
    """Class folder names in label-id order, as torchvision's `find_classes`; [] for a folder of
    images without class folders (unlabelled). Images beside class folders are not read, as in
    torchvision."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} does not exist or is not a directory")
    entries = list(os.scandir(directory))
    classes = sorted(entry.name for entry in entries if entry.is_dir())
    if not classes and not any(_is_image(entry.name, extensions) for entry in entries if entry.is_file()):
        raise FileNotFoundError(f"no class folder and no image in {directory}: expected {directory}/<class>/<image> "
                                f"(labelled) or {directory}/<image> (unlabelled; extensions: {', '.join(extensions)})")
    return classes


def _is_image(file_name: str, extensions: tuple[str, ...]) -> bool:
    return file_name.lower().endswith(extensions)


def list_images(directory: str | Path, classes: Sequence[str],
                extensions: tuple[str, ...] = IMG_EXTENSIONS) -> tuple[list[str], list[int]]:
    """(paths, labels) in torchvision's `make_dataset` order; an empty class is an error. With no
    class, the images directly in `directory`, sorted, each labelled `NO_LABEL`."""
    if not classes:
        names = sorted(entry.name for entry in os.scandir(directory)
                       if entry.is_file() and _is_image(entry.name, extensions))
        return [os.path.join(directory, name) for name in names], [NO_LABEL] * len(names)
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = [
            os.path.join(root, fname)
            for root, _, fnames in sorted(os.walk(Path(directory) / name, followlinks=True))
            for fname in sorted(fnames)
            if _is_image(fname, extensions)
        ]
        if not found:
            empty.append(str(Path(directory) / name))
        paths += found
        labels += [label] * len(found)
    if empty:
        raise FileNotFoundError(
            f"no image in class folder(s) {', '.join(empty)} (extensions: {', '.join(extensions)})"
        )
    return paths, labels


def split_dir(data_path: str | Path, split: str) -> Path:
    """`DATA/<split>`; for 'train', a bare ImageFolder `DATA/<class>/...` is accepted too."""
    root = Path(data_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--data_path {root} does not exist or is not a directory")
    if (root / split).is_dir():
        return root / split
    if split == "train" and not (root / "val").is_dir():
        log.info("%s has no train/ folder: reading it as the training images", root)
        return root
    raise FileNotFoundError(f"no {split}/ folder in --data_path {root} (expected {root}/{split}/<class>/<image>)")


def check_labelled(source: Source, data_path: str | Path | None, split: str) -> None:
    """Refuse, in one line, a split whose images have no labels, for a command that needs them."""
    if source.num_classes == 0:
        raise ValueError(f"--data_path {data_path}: its {split} images have no class folders (unlabelled); this "
                         f"command needs labels: {split}/<class>/<image>")


def _part_files(
    paths: Sequence[str], data_path: Path, part_path: Path, missing: MissingParts
) -> tuple[list[str], list[str]]:
    """(the part map of every image, '' where none; the images without one).

    An image without a part map is an error naming it under 'error'. The part tree is
    walked once rather than probing a path per image.
    """
    expected = [str(part_map_path(part_path, data_path, p)) for p in paths]
    existing = {os.path.join(root, f) for root, _, files in os.walk(part_path, followlinks=True) for f in files}
    absent = [image for image, part in zip(paths, expected, strict=True) if part not in existing]
    if absent and missing == "error":
        shown = "\n  ".join(f"{image} (expected {part_map_path(part_path, data_path, image)})" for image in absent[:5])
        raise FileNotFoundError(
            f"{len(absent)} of {len(paths)} images have no part map under --part_path {part_path}, e.g.:\n  {shown}\n"
            "(use missing_parts='unlabelled' to train them with every patch unlabelled)"
        )
    if absent:
        log.warning(
            "%d of %d images have no part map under %s: treated as unlabelled (e.g. %s)",
            len(absent),
            len(paths),
            part_path,
            absent[0],
        )
    return [part if part in existing else "" for part in expected], absent


class IndexedSource:
    """A source whose examples have ids 0..N-1 and can be read in any order (image folders, packed data).

    Training order: the ids are shuffled per epoch by numpy seeded with (seed, epoch);
    evaluation: each process reads its `eval_share` in id order. Subclasses hold the class
    names and one label per example, and say what a reference holds (`_columns`) and what an
    example is called (`_name`).
    """

    classes: tuple[str, ...]  # class names in label order
    labels: np.ndarray  # int64 [N]: the label of each example

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _columns(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _name(self, example_id: int) -> str:
        raise NotImplementedError

    def steps_per_epoch(self, process_batch: int, shard: Shard) -> int:
        return self.num_examples // (process_batch * shard.count)

    def train_stream(self, epoch: int, seed: int, process_batch: int, shard: Shard, start_step: int) -> Stream:
        steps = self.steps_per_epoch(process_batch, shard)
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(self.num_examples)
        mine = order[: steps * process_batch * shard.count].reshape(steps, shard.count, process_batch)[:, shard.index]
        return self._stream(mine.reshape(-1), first_pos=start_step * process_batch)

    def eval_stream(self, shard: Shard) -> Stream:
        return self._stream(np.arange(*eval_share(self.num_examples, shard)), first_pos=0)

    def _stream(self, ids: np.ndarray, first_pos: int) -> Stream:
        """References for `ids[first_pos:]`; nothing before `first_pos` is ever read."""
        rest = ids[first_pos:]
        columns = {
            **self._columns(rest),
            "id": rest.astype(np.int64),
            "pos": np.arange(first_pos, len(ids), dtype=np.int64),
        }
        return Stream(tf.data.Dataset.from_tensor_slices(columns), len(ids), lambda pos: self._name(int(ids[pos])))


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSource(IndexedSource):
    """One split of an image-folder dataset, with optional part maps (a mirrored PNG tree)."""

    root: Path  # the split's folder, holding the class folders
    classes: tuple[str, ...]
    paths: np.ndarray  # str [N]
    labels: np.ndarray  # int64 [N]
    part_paths: np.ndarray  # str [N], '' for an image without a part map
    missing_parts: tuple[str, ...] = ()  # images without a part map (under 'unlabelled')

    def _columns(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"path": self.paths[ids], "part": self.part_paths[ids], "label": self.labels[ids]}

    def _name(self, example_id: int) -> str:
        return str(self.paths[example_id])

    def part_map_name(self, image_name: str) -> str:
        """The part-map file of an image (for error messages)."""
        return str(self.part_paths[np.flatnonzero(self.paths == image_name)[0]])

    def load(self, ref: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        path = ref["path"]
        return {"image": tf.io.read_file(path), "part": read_part_map_bytes(ref["part"]), "pil": needs_pil(path)}


def needs_pil(file_name: tf.Tensor) -> tf.Tensor:
    """Graph op: whether a file of this name is in a format only PIL decodes (TIFF, PPM/PGM)."""
    return tf.strings.regex_full_match(tf.strings.lower(file_name), _PIL_ONLY_PATTERN)


def read_part_map_bytes(path: tf.Tensor) -> tf.Tensor:
    """Graph op: the encoded part map at `path`, or b'' for '' (an image without one)."""
    return tf.cond(tf.strings.length(path) > 0, lambda: tf.io.read_file(path), lambda: tf.constant(b""))


def image_folder(
    data_path: str | Path,
    split: str = "train",
    part_path: str | Path | None = None,
    missing_parts: MissingParts = "error",
    extensions: tuple[str, ...] = IMG_EXTENSIONS,
) -> FolderSource:
    """List `data_path/split` (torchvision's order) and, with `part_path`, its part maps.

    Args:
      data_path: the dataset root (`--data_path`), holding `train/` and `val/`.
      split: 'train' or 'val'.
      part_path: root of the part-map tree mirroring `data_path` (`--part_path`).
      missing_parts: an image without a part map is an error naming it ('error'), or
        trained with every patch unlabelled and counted ('unlabelled').
      extensions: the files that are images (`BAND_EXTENSIONS` where bands are read).
    """
    root = split_dir(data_path, split)
    classes = find_classes(root, extensions)
    paths, labels = list_images(root, classes, extensions)
    parts, absent = [""] * len(paths), []
    if part_path is not None:
        if not Path(part_path).is_dir():
            raise FileNotFoundError(f"--part_path {part_path} does not exist or is not a directory")
        parts, absent = _part_files(paths, Path(data_path), Path(part_path), missing_parts)
    return FolderSource(
        root=root,
        classes=tuple(classes),
        paths=np.asarray(paths, dtype=object).astype(str),
        labels=np.asarray(labels, dtype=np.int64),
        part_paths=np.asarray(parts, dtype=object).astype(str),
        missing_parts=tuple(absent),
    )
