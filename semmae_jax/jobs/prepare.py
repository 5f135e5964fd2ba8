"""`python main.py prepare --data_path DIR [--part_path P] --out PACKED`: pack an image folder (and its
part maps) into TFRecord shards for `--data_path` (the layout is `semmae_jax.data.packed`'s)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from semmae_jax.data import packed
from semmae_jax.data.packed import prepare


def main(argv: Sequence[str] | None = None) -> None:
    """`main.py prepare`: pack an image folder (and its part maps) for `--data_path`."""
    parser = argparse.ArgumentParser(prog="main.py prepare", description=packed.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="image folder: DIR/train/<class>/..., DIR/val/...")
    parser.add_argument("--part_path", default=None, help="part-map tree mirroring --data_path")
    parser.add_argument("--out", required=True, help="folder to write the packed dataset to")
    parser.add_argument("--max_size", type=int, default=None, help="re-encode JPEGs whose longer side exceeds this")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--images_per_shard", type=int, default=1024)
    parser.add_argument("--missing_part_map", choices=("error", "unlabelled"), default="error")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        index = prepare(args.data_path, args.out, args.part_path, args.max_size, args.images_per_shard,
                        args.quality, args.missing_part_map)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        parser.error(str(error))
    seconds = time.perf_counter() - start
    total = sum(entry["count"] for entry in index["splits"].values())
    for split, entry in index["splits"].items():
        print(f"{split}: {entry['count']} images in {len(entry['shards'])} shards "
              f"({entry['with_part_map']} with a part map)")
    print(f"packed {total} images into {args.out} in {seconds:.1f} s ({1000 * seconds / max(total, 1):.1f} s per 1,000)")
