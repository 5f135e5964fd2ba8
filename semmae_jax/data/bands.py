"""Images that are not 8-bit RGB: any number of bands, any bit depth.

Remote-sensing tiles (4 to 13 bands, 16-bit GeoTIFF), medical scans (one 12/16-bit channel),
microscopy stacks: read without loss, as the file stores them, by tifffile (TIFF / GeoTIFF),
numpy (`.npy`, [H, W, C] or [H, W]) or PIL (8- and 16-bit PNG and the other formats), then
resized in float32 and normalised per band, (x - mean) / std in the file's own units (the
graph ops are `transforms.decode_bands`, `resize_bands`, `normalize_bands`; this module needs no
TensorFlow, and reads its files' libraries (PIL, tifffile) on first use: the training step's
modules import it on hosts without them).

`Bands` (a mean and a std per band) is what a dataset needs beyond its files; `--mean` /
`--std` give it, or `main.py prepare --stats` measures it and stores it with the dataset
(`STATS_FILE` in its root), where every job finds it. `scan` reads every file's header before
a run starts: a file whose band count differs from the model's, or whose sample type differs
from the others', is one line naming it. 8-bit RGB datasets keep the RGB path (torchvision's
pixels, uint8 to the device); this one is taken when the model's bands are not 3 or the
dataset has its own statistics.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

STATS_FILE = "band_stats.json"
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
NPY_MAGIC = b"\x93NUMPY"


@dataclasses.dataclass(frozen=True)
class Bands:
    """Per-band mean and std (the file's units: 0-65535 for 16-bit) that normalise the images."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"--mean and --std need one value per band each; got {len(self.mean)} and {len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"--std must be positive for every band; got {list(self.std)}")

    @property
    def count(self) -> int:
        return len(self.mean)


def read_pixels(data: bytes) -> np.ndarray:
    """An encoded image as [H, W, C] in its stored type (uint8, uint16, float32, ...), nothing converted."""
    if data[:4] in TIFF_MAGIC:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            series = tiff.series[0]
            pixels, axes = series.asarray(), series.axes
        if pixels.ndim == 3 and axes.endswith("YX"):  # planar bands first (GeoTIFFs often are): to [H, W, C]
            pixels = pixels.transpose(1, 2, 0)
    elif data[:6] == NPY_MAGIC:
        pixels = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3:
        raise ValueError(f"an image of shape {pixels.shape}: expected [H, W] or [H, W, bands]")
    return pixels


def header(path: str | Path) -> tuple[int, str]:
    """(bands, sample type) of an image file, from its header where the format has one."""
    path = Path(path)
    with path.open("rb") as stream:
        magic = stream.read(6)
    if magic[:4] in TIFF_MAGIC:
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            shape, dtype, axes = series.shape, series.dtype, series.axes
        bands = 1 if len(shape) == 2 else shape[0] if axes.endswith("YX") else shape[-1]
        return bands, str(dtype)
    if magic == NPY_MAGIC:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return (1 if array.ndim == 2 else array.shape[-1]), str(array.dtype)
    from PIL import Image

    with Image.open(path) as image:
        bands = len(image.getbands())
        dtype = {"I;16": "uint16", "I;16B": "uint16", "I": "int32", "F": "float32"}.get(image.mode, "uint8")
    return bands, dtype


def scan(paths: Iterable[str], count: int) -> str:
    """The sample type every file shares; one line naming the first file whose bands are not `count`
    or whose type differs from the first file's (before any step runs)."""
    first: tuple[str, str] | None = None
    for path in paths:
        try:
            bands, dtype = header(path)
        except (OSError, ValueError):  # a damaged file: the pipeline names and skips it, as an RGB image's
            continue
        if bands != count:
            raise ValueError(f"{path} has {bands} band(s), the model takes {count} (--in_chans)")
        if first is None:
            first = (path, dtype)
        elif dtype != first[1]:
            raise ValueError(f"{path} holds {dtype} samples, {first[0]} holds {first[1]}: one dataset, one type")
    return first[1] if first else "uint8"


def measure(paths: Sequence[str]) -> Bands:
    """Per-band mean and std over every pixel of `paths` (float64 sums: exact enough for 16-bit data)."""
    total = squares = None
    pixels = 0
    for path in paths:
        image = read_pixels(Path(path).read_bytes())
        values = image.reshape(-1, image.shape[-1]).astype(np.float64)
        total = values.sum(0) if total is None else total + values.sum(0)
        squares = (values**2).sum(0) if squares is None else squares + (values**2).sum(0)
        pixels += len(values)
    if not pixels:
        raise ValueError("no image to measure")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0.0))
    return Bands(tuple(float(m) for m in mean), tuple(float(s) if s > 0 else 1.0 for s in std))


def save_stats(root: str | Path, bands: Bands, count: int) -> Path:
    """`bands` as the dataset's statistics (`STATS_FILE` in `root`), with the number of images measured."""
    path = Path(root) / STATS_FILE
    path.write_text(json.dumps({"mean": list(bands.mean), "std": list(bands.std), "images": count}, indent=1) + "\n")
    return path


def load_stats(root: str | Path) -> Bands | None:
    """The statistics stored with a dataset (`prepare --stats`), or None."""
    path = Path(root) / STATS_FILE
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    return Bands(tuple(stored["mean"]), tuple(stored["std"]))


def data_bands(root: str | Path | None, count: int, mean: Sequence[float] | None,
               std: Sequence[float] | None) -> Bands | None:
    """The dataset's `Bands`: `--mean` / `--std` if given, else those stored with it (`prepare --stats`);
    None (the RGB path, ImageNet's statistics) for 3 bands without either. A count that disagrees,
    or bands other than 3 with no statistics, is one line saying what to give."""
    if (mean is None) != (std is None):
        raise ValueError("--mean and --std go together: give both, one value per band")
    bands = Bands(tuple(mean), tuple(std)) if mean is not None else load_stats(root) if root else None
    if bands is None:
        if count != 3:
            raise ValueError(f"{count}-band images need their statistics: --mean and --std (one value per band, "
                             f"in the files' units), or `main.py prepare --data_path {root or 'DIR'} --stats`")
        return None
    if bands.count != count:
        where = "--mean / --std" if mean is not None else f"{Path(root) / STATS_FILE}"
        raise ValueError(f"{where} describe {bands.count} band(s), the model takes {count} (--in_chans)")
    return bands
