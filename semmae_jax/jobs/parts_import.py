"""`python main.py parts import-semmae SRC DST`: the original release's part records -> part-map PNGs
(the record format is `semmae_jax.parts.semmae_records`')."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from semmae_jax.parts.semmae_records import import_tree


def main(argv: Sequence[str] | None = None) -> None:
    """`python main.py parts import-semmae SRC DST`; exits 1 when nothing was converted, 2 on usage."""
    parser = argparse.ArgumentParser(
        prog="main.py parts import-semmae",
        description="Turn a tree of the original SemMAE's part records (.npy, 196 x 207) into 28 x 28 "
        "part-map PNGs under DST with the same relative paths (255 = no part). Bad records are named and skipped.",
        epilog="exit status: 0 when records were converted (some may be rejected), 1 when none were, 2 on usage errors",
    )
    parser.add_argument("src", type=Path, metavar="SRC", help="directory searched recursively for *.npy records")
    parser.add_argument("dst", type=Path, metavar="DST", help="output root for the part-map PNGs")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.exit(2, f"{parser.prog}: error: SRC {args.src} is not a directory\n")
    summary = import_tree(args.src, args.dst)
    print(summary)
    if not summary.converted:
        raise SystemExit(1)
