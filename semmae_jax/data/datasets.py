"""`open_source`: the dataset the command-line flags name (image folder, packed data, TFDS).

The one place that knows every kind of source, above them all (each kind builds on
`sources.py`; none imports this module), so the kinds import no circle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from semmae_jax.data.bands import Bands, scan
from semmae_jax.data.packed import PACKED_INDEX, packed_source
from semmae_jax.data.sources import (
    BAND_EXTENSIONS,
    IMG_EXTENSIONS,
    FolderSource,
    MissingParts,
    Source,
    check_labelled,
    image_folder,
)


def open_source(
    data_path: str | Path | None = None,
    split: Literal["train", "val"] = "train",
    *,
    dataset: str = "folder",
    tfds_data_dir: str | None = None,
    part_path: str | Path | None = None,
    missing_parts: MissingParts = "error",
    labelled: bool = False,
    bands: Bands | None = None,
) -> Source:
    """The dataset named by the command-line flags.

    Args:
      data_path: `--data_path`, for `dataset='folder'`: an image folder, or packed data
        (`main.py prepare`; recognised by its `packed.json`).
      split: 'train' or 'val' ('val' is TFDS's 'validation', else 'test').
      dataset: 'folder' (an image folder at `data_path`) or 'tfds:NAME' (`--dataset`).
      tfds_data_dir: `--tfds_data_dir`, TFDS's data dir (ImageNet's archives go in its
        `downloads/manual/`, as TFDS documents).
      part_path, missing_parts: part maps (see `image_folder`; for TFDS, `tfds_source`).
      labelled: refuse a split without labels (a folder of images without class folders).
      bands: images that are not 8-bit RGB (`data.bands`): an image folder's files are checked
        now, every header, against the band count and each other (packed data by `prepare --stats`;
        else an image that disagrees is named and skipped as it is read).
    """
    if bands is not None and dataset != "folder":
        raise ValueError(f"{bands.count}-band images are read from image folders or packed data, not {dataset}")
    source = _source(data_path, split, dataset, tfds_data_dir, part_path, missing_parts,
                     IMG_EXTENSIONS if bands is None else BAND_EXTENSIONS)
    if labelled:
        check_labelled(source, data_path, split)
    if bands is not None and isinstance(source, FolderSource):
        scan(source.paths, bands.count)
    return source


def _source(data_path: str | Path | None, split: Literal["train", "val"], dataset: str, tfds_data_dir: str | None,
            part_path: str | Path | None, missing_parts: MissingParts, extensions: tuple[str, ...]) -> Source:
    if dataset.startswith("tfds:"):
        from semmae_jax.data.tfds_source import tfds_source  # lazily: TFDS is slow to import

        return tfds_source(dataset.removeprefix("tfds:"), split, tfds_data_dir, part_path, missing_parts)
    if dataset != "folder":
        raise ValueError(f"unknown dataset {dataset!r}: use 'folder' (with --data_path) or 'tfds:NAME'")
    if data_path is None:
        raise ValueError("an image-folder dataset needs --data_path")
    if (Path(data_path) / PACKED_INDEX).is_file():
        return packed_source(data_path, split, part_path)
    return image_folder(data_path, split, part_path, missing_parts, extensions)
