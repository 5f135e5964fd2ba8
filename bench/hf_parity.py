"""docs/converting.md's parity table for transformers directories, re-measured from scratch.

    python bench/hf_parity.py [--batch_size 8] [--rows NAME,...]

Each row is a `save_pretrained` directory of the hub's shapes and configs
(`facebook/vit-mae-base`, `google/vit-base-patch16-224(-in21k)`: eps 1e-12, exact GELU),
with random weights of a real scale (`tests/torch_helpers.randomize_`: perturbed norms and
biases), checked by `main.py parity --checkpoint DIR` exactly as a user runs it: transformers'
own class loaded by `from_pretrained` from DIR against the JAX model, on one seeded random
batch, float32, CPU. Prints the markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert import cli, parity  # noqa: E402  (before TensorFlow: see convert.references)
from tests.torch_helpers import random_hf  # noqa: E402  (random weights of a real scale, as the tests use)

# name -> (class, config fields beyond the hub's defaults, extra parity flags, round trip through to-flax + to-hf)
ROWS = {
    "ViTMAEForPreTraining B/16 (pred; mask identical)": ("ViTMAEForPreTraining", {}, [], False),
    "ViTMAEForPreTraining B/16, norm_pix_loss": ("ViTMAEForPreTraining", {}, ["--norm_pix_loss"], False),
    "ViTMAEForPreTraining B/16 after to-flax + to-hf": ("ViTMAEForPreTraining", {}, [], True),
    "ViTMAEForPreTraining B/16, qkv_bias false": ("ViTMAEForPreTraining", {"qkv_bias": False}, [], False),
    "ViTMAEModel B/16 (cls features)": ("ViTMAEModel", {}, [], False),
    "ViTModel B/16 with its pooler (pooler_output)": ("ViTModel", {}, [], False),
    "ViTForImageClassification B/16, 1000 classes": ("ViTForImageClassification", {"num_labels": 1000}, [], False),
}
SHOWN = {"max abs diff": ("max |pred diff|", "max |feature diff|", "max |logit diff|"),
         "max rel diff": ("max |feature diff| / max |feature|", "max |logit diff| / max |logit|"),
         "loss rel diff": ("|loss diff| / |loss|",), "top-1 agreement": ("top-1 agreement",)}  # fmt: skip


def measure(name: str, batch_size: int, scratch: Path) -> dict[str, str]:
    hf_class, fields, flags, round_trip = ROWS[name]
    directory = scratch / "hub"
    random_hf(hf_class, **fields).save_pretrained(directory)  # the hub's B/16 config
    if round_trip:
        cli.main(["to-flax", str(directory), str(scratch / "flax")])
        cli.main(["to-hf", str(scratch / "flax"), str(scratch / "back")])
        directory = scratch / "back"
    args = parity.parser().parse_args(["--checkpoint", str(directory), "--batch_size", str(batch_size), *flags])
    rows = {row.name: row for row in parity.compare(args)}
    failed = [row.name for row in rows.values() if not row.ok]
    if failed:
        raise SystemExit(f"{name}: parity FAILED on {', '.join(failed)}")
    cells = {}
    for column, names in SHOWN.items():
        row = next((rows[n] for n in names if n in rows), None)
        cells[column] = "" if row is None else (f"{100 * row.value:.0f}%" if column == "top-1 agreement" else f"{row.value:.1e}")
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rows", default=None, help=f"comma-separated row names (default all: {', '.join(ROWS)})")
    args = parser.parse_args(argv)
    names = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; the rows are {list(ROWS)}")
    lines = ["| checkpoint | max abs diff | max rel diff | loss rel diff | top-1 agreement |", "|---|---|---|---|---|"]
    for name in names:
        with tempfile.TemporaryDirectory() as scratch:
            cells = measure(name, args.batch_size, Path(scratch))
        lines.append(f"| {name} | " + " | ".join(cells.values()) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
