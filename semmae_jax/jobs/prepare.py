"""`python main.py prepare --data_path DIR [--part_path P] --out PACKED`: pack an image folder (and its
part maps) into TFRecord shards for `--data_path` (the layout is `semmae_jax.data.packed`'s);
`--stats` measures each band's mean and std over the train split and stores them with the dataset
(`semmae_jax.data.bands`), for images that are not 8-bit RGB."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from semmae_jax.data import bands, packed
from semmae_jax.data.packed import prepare
from semmae_jax.data.sources import BAND_EXTENSIONS, IMG_EXTENSIONS, image_folder


def main(argv: Sequence[str] | None = None) -> None:
    """`main.py prepare`: pack an image folder (and its part maps) for `--data_path`."""
    parser = argparse.ArgumentParser(prog="main.py prepare", description=packed.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="image folder: DIR/train/<class>/..., DIR/val/...")
    parser.add_argument("--part_path", default=None, help="part-map tree mirroring --data_path")
    parser.add_argument("--out", default=None, help="folder to write the packed dataset to")
    parser.add_argument("--stats", action="store_true",
                        help=f"measure each band's mean and std over the train split (every file checked for the same "
                             f"bands and sample type) and store them with the dataset ({bands.STATS_FILE} in "
                             "--data_path, and in --out)")
    parser.add_argument("--max_size", type=int, default=None, help="re-encode JPEGs whose longer side exceeds this")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--images_per_shard", type=int, default=1024)
    parser.add_argument("--missing_part_map", choices=("error", "unlabelled"), default="error")
    args = parser.parse_args(argv)
    if args.out is None and not args.stats:
        parser.error("give --out (to pack the dataset), --stats (to measure its bands), or both")
    try:
        if args.out is not None:
            pack(args)
        if args.stats:
            measure_bands(args.data_path, [args.data_path] + ([args.out] if args.out else []))
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        parser.error(str(error))


def pack(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    extensions = BAND_EXTENSIONS if args.stats else IMG_EXTENSIONS  # --stats: a dataset of bands, .npy too
    index = prepare(args.data_path, args.out, args.part_path, args.max_size, args.images_per_shard, args.quality,
                    args.missing_part_map, extensions)
    seconds = time.perf_counter() - start
    total = sum(entry["count"] for entry in index["splits"].values())
    for split, entry in index["splits"].items():
        print(f"{split}: {entry['count']} images in {len(entry['shards'])} shards "
              f"({entry['with_part_map']} with a part map)")
    print(f"packed {total} images into {args.out} in {seconds:.1f} s ({1000 * seconds / max(total, 1):.1f} s per 1,000)")


def measure_bands(data_path: str, roots: Sequence[str]) -> None:
    """Each band's mean and std over the train split, stored in every one of `roots`."""
    paths = list(image_folder(data_path, "train", extensions=BAND_EXTENSIONS).paths)
    count, _ = bands.header(paths[0])
    sample_type = bands.scan(paths, count)
    measured = bands.measure(paths)
    stored = [bands.save_stats(root, measured, len(paths)) for root in roots]
    print(f"{count} band(s) of {sample_type} over {len(paths)} images: mean {[round(m, 4) for m in measured.mean]}, "
          f"std {[round(s, 4) for s in measured.std]}; stored in {', '.join(map(str, stored))}")
