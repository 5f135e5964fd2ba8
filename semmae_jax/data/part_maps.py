"""Part maps: the project's own format for SemMAE's semantic parts.

One single-channel PNG per training image, in a tree that mirrors the image tree
(`train/n01440764/x.JPEG` -> `PART_ROOT/train/n01440764/x.png`); pixel values are part
ids 0..K-1 and 255 means "no part". Any resolution: the input pipeline warps the map
with the same crop/resize/flip as the image (nearest neighbour) and reduces it to one
label per patch by majority vote (`patch_vote`), -1 standing for "no part".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NO_PART = 255  # pixel value of "no part" in a part-map PNG
UNLABELLED = -1  # per-patch label of "no part" in `part_labels`
MAX_PARTS = 255


def part_map_path(part_root: str | Path, image_root: str | Path, image_path: str | Path) -> Path:
    """Where the part map of `image_path` (under `image_root`) lives under `part_root`."""
    relative = Path(image_path).relative_to(image_root)
    return Path(part_root) / relative.with_suffix(".png")


def write_part_map(path: str | Path, labels: np.ndarray) -> None:
    """Save an [H, W] map of part ids (0..254, `NO_PART` for none) as an 8-bit PNG."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"part map for {path} must be 2-D [H, W], got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > NO_PART):
        raise ValueError(f"part map for {path} has values outside 0..{NO_PART}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def read_part_map(path: str | Path) -> np.ndarray:
    """Load a part-map PNG as uint8 [H, W]; a clear error for anything else."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise ValueError(f"part map {path} must be a single-channel PNG, got mode {image.mode}")
            return np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)
    except (OSError, SyntaxError) as error:
        raise ValueError(f"part map {path} is not a readable PNG: {error}") from error


def patch_vote(label_map: np.ndarray, patch_size: int) -> np.ndarray:
    """Majority part per patch of an [H, W] uint8 map -> [L] int32 (row-major, -1 = no part).

    "No part" takes part in the vote; ties go to the smallest value. This numpy
    version is the reference the tf.data implementation is tested against.
    """
    h, w = label_map.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"part map of {h}x{w} is not divisible into {p}x{p} patches")
    patches = label_map.reshape(h // p, p, w // p, p).transpose(0, 2, 1, 3).reshape(-1, p * p)
    counts = np.stack([(patches == v).sum(axis=1) for v in range(NO_PART + 1)], axis=1)
    winner = counts.argmax(axis=1).astype(np.int32)
    return np.where(winner == NO_PART, UNLABELLED, winner).astype(np.int32)
