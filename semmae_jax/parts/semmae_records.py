"""Import of the original SemMAE's released part data into this project's part maps.

The original ships one `.npy` record per training image: 196 rows (patches of a ViT-B/8
at 224, a subset of the 28 x 28 grid) by 207 columns:

* 0-6: the sizes of the 7 parts, repeated on every row;
* 7-13: the one-hot part of this patch;
* 14: the patch's index in the 28 x 28 grid (its position-table row);
* 15-206: the patch's 8 x 8 x 3 pixels.

Each record becomes a 28 x 28 part-map PNG (`semmae_jax.data.part_maps`), the part of
every listed grid position, `NO_PART` where the record has no row. Every row has a part,
so the PNG's labelled positions are exactly the record's token positions. The pixels
are not needed for a part map and are only checked to be finite: this project reads
its images from its own image tree, and `x.npy` becomes `x.png`, the name the pipeline
looks up for image `x.JPEG` (`part_maps.part_map_path`).

Part sizes are checked as `sizes >= one-hot counts`, not equality: the rows are a
subset of the grid and nothing in the format says whether a size counts the part's
patches in the record or in the whole image. The summary counts the records whose
sizes exceed their one-hot counts, which tells which reading a given release follows.
The masking recomputes part sizes from the map, so the import does not depend on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from semmae_jax.data.part_maps import NO_PART, write_part_map

GRID = 28
NUM_PARTS = 7
RECORD_SHAPE = (196, 207)
SIZES = slice(0, NUM_PARTS)
ONE_HOT = slice(NUM_PARTS, 2 * NUM_PARTS)
GRID_INDEX = 2 * NUM_PARTS


class BadRecord(Exception):
    """A record that cannot be imported; the message is the reason shown to the user.

    Not a ValueError, so that numpy's own ValueErrors can be caught and rewrapped around it.
    """


@dataclass
class ImportSummary:
    converted: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path relative to SRC, reason)
    sizes_beyond_record: int = 0  # converted records whose sizes exceed their one-hot counts

    def __str__(self) -> str:
        total = self.converted + len(self.rejected)
        return (
            f"converted {self.converted}, rejected {len(self.rejected)} of {total} .npy files; "
            f"{self.sizes_beyond_record} converted records have part sizes above their one-hot counts"
        )


def load_record(path: str | Path) -> np.ndarray:
    """Read one record as float64 [196, 207] without running pickle code or trusting its header.

    Memory-mapping first lets the shape and dtype be checked before any data is read,
    so a corrupt header cannot make us allocate what it claims.
    """
    try:
        with open(path, "rb") as file:
            if file.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                raise BadRecord("not a .npy file (no NUMPY header)")
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise BadRecord(f"unreadable .npy: {error}") from error
    if mapped.shape != RECORD_SHAPE:
        raise BadRecord(f"shape {mapped.shape}, expected {RECORD_SHAPE}")
    if not (np.issubdtype(mapped.dtype, np.integer) or np.issubdtype(mapped.dtype, np.floating)):
        raise BadRecord(f"dtype {mapped.dtype}, expected a real number type")
    return np.array(mapped, dtype=np.float64)


def parse_record(record: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a loaded record; returns (grid indices [196], part ids [196], part sizes [7]).

    Raises:
      BadRecord: with the first problem found.
    """
    if not np.isfinite(record).all():
        raise BadRecord("non-finite values")
    parts = _parts(record[:, ONE_HOT])
    return _grid_index(record[:, GRID_INDEX]), parts, _sizes(record[:, SIZES], parts)


def _parts(one_hot: np.ndarray) -> np.ndarray:
    bad_rows = ~np.isin(one_hot, (0.0, 1.0)).all(axis=1) | (one_hot.sum(axis=1) != 1)
    if bad_rows.any():
        raise BadRecord(f"part columns are not one-hot in rows {np.flatnonzero(bad_rows)[:5].tolist()}")
    return one_hot.argmax(axis=1)


def _grid_index(index: np.ndarray) -> np.ndarray:
    if (index != np.round(index)).any() or index.min() < 0 or index.max() >= GRID * GRID:
        raise BadRecord(f"grid indices must be integers in 0..{GRID * GRID - 1}")
    values, occurrences = np.unique(index.astype(np.int64), return_counts=True)
    if (occurrences > 1).any():
        raise BadRecord(f"duplicate grid indices {values[occurrences > 1][:5].tolist()}")
    return index.astype(np.int64)


def _sizes(sizes: np.ndarray, parts: np.ndarray) -> np.ndarray:
    if (sizes != sizes[0]).any():
        raise BadRecord("part sizes differ between rows")
    sizes, counts = sizes[0], np.bincount(parts, minlength=NUM_PARTS)
    if (sizes != np.round(sizes)).any() or (sizes < counts).any() or sizes.sum() > GRID * GRID:
        raise BadRecord(
            f"part sizes {sizes.tolist()} inconsistent with one-hot counts {counts.tolist()} "
            f"(need integers >= the counts, at most {GRID * GRID} in all)"
        )
    return sizes.astype(np.int64)


def part_map(index: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """The 28 x 28 uint8 part map: the record's part at each listed position, NO_PART elsewhere."""
    grid = np.full(GRID * GRID, NO_PART, np.uint8)
    grid[index] = parts
    return grid.reshape(GRID, GRID)


def import_tree(src: str | Path, dst: str | Path, *, progress: bool = True) -> ImportSummary:
    """Convert every `*.npy` under `src` to `dst/<same relative path>.png`.

    A bad record is reported (on stderr, by relative path and reason), skipped and
    counted; the run goes on. Errors writing `dst` are not the records' fault and stop it.
    """
    src, dst = Path(src), Path(dst)
    files = sorted(path for path in src.rglob("*.npy") if path.is_file())
    summary = ImportSummary()
    for path in tqdm(files, desc="import-semmae", unit="file", disable=not progress):
        relative = path.relative_to(src)
        try:
            index, parts, sizes = parse_record(load_record(path))
        except BadRecord as error:
            summary.rejected.append((str(relative), str(error)))
            tqdm.write(f"rejected {relative}: {error}", file=sys.stderr)
            continue
        write_part_map(dst / relative.with_suffix(".png"), part_map(index, parts))
        summary.converted += 1
        summary.sizes_beyond_record += int((sizes > np.bincount(parts, minlength=NUM_PARTS)).any())
    return summary
