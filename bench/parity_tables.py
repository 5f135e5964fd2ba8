"""docs/converting.md's two parity tables, re-measured from scratch: `.pth` checkpoints and
transformers directories.

    python bench/parity_tables.py [--table pth|hf] [--batch_size 8] [--rows NAME,...]

Each row writes a checkpoint of a real model's shape with random weights of a real scale
(`tests/torch_helpers.randomize_`: perturbed norms and biases) and checks it with
`main.py parity --checkpoint FILE_OR_DIR` exactly as a user runs it, on one seeded random batch,
float32, CPU. `pth`: timm's `VisionTransformer` / transformers' MAE weights saved in the
original's `.pth` layout, run by timm (classifiers, encoders) or transformers (MAE). `hf`:
`save_pretrained` directories of the hub's shapes and configs (`facebook/vit-mae-base`,
`google/vit-base-patch16-224(-in21k)`: eps 1e-12, exact GELU), run by transformers' own class
loaded by `from_pretrained`. Prints each table in markdown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert import cli  # noqa: E402  (before TensorFlow: see convert.parity.references)
from convert.arch import full_config  # noqa: E402
from convert.parity import forward as parity  # noqa: E402
from convert.parity import references  # noqa: E402
from convert.safe_load import save_torch_checkpoint  # noqa: E402
from tests.torch_helpers import numpy_state_dict, pth_layout, random_hf, randomize_  # noqa: E402

Maker = Callable[[Path], Path]  # scratch directory -> the checkpoint `parity` reads


def timm_pth(name: str, **overrides: object) -> Maker:
    """timm's classifier / encoder of `name`'s shape, saved as a `.pth`."""

    def make(scratch: Path) -> Path:
        model = randomize_(references.timm_classifier(full_config(name, **overrides)), seed=0)
        save_torch_checkpoint(scratch / "model.pth", numpy_state_dict(model))
        return scratch / "model.pth"

    return make


def mae_pth(scratch: Path) -> Path:
    """transformers' MAE of `mae_vit_base_patch16`'s shape, saved in the original's `.pth` layout."""
    model = randomize_(references.hf_mae(full_config("mae_vit_base_patch16")), seed=0)
    save_torch_checkpoint(scratch / "mae.pth", pth_layout(model, scratch / "hf"))
    return scratch / "mae.pth"


def hub_dir(hf_class: str, round_trip: bool = False, **fields: object) -> Maker:
    """A `save_pretrained` directory of the hub's B/16 config (`round_trip`: after to-flax + to-hf)."""

    def make(scratch: Path) -> Path:
        random_hf(hf_class, **fields).save_pretrained(scratch / "hub")
        if not round_trip:
            return scratch / "hub"
        cli.main(["to-flax", str(scratch / "hub"), str(scratch / "flax")])
        cli.main(["to-hf", str(scratch / "flax"), str(scratch / "back")])
        return scratch / "back"

    return make


# table -> row name -> (checkpoint maker, extra parity flags)
TABLES: dict[str, dict[str, tuple[Maker, list[str]]]] = {
    "pth": {
        "ViT-B/16 global pool": (timm_pth("vit_base_patch16"), []),
        "ViT-B/16 cls token": (timm_pth("vit_base_patch16", global_pool=False), []),
        "ViT-B/8 global pool": (timm_pth("vit_base_patch8"), []),
        "ViT-B/8 cls token": (timm_pth("vit_base_patch8", global_pool=False), []),
        "ViT-L/16 global pool": (timm_pth("vit_large_patch16"), []),
        "ViT-B/16 at 384 (resampled)": (timm_pth("vit_base_patch16"), ["--img_size", "384"]),
        "ViT-B/16 encoder only (features)": (timm_pth("vit_base_patch16", num_classes=0, global_pool=False), []),
        "MAE ViT-B/16 (pred; mask identical)": (mae_pth, []),
        "MAE ViT-B/16, norm_pix_loss": (mae_pth, ["--norm_pix_loss"]),
    },
    "hf": {
        "ViTMAEForPreTraining B/16 (pred; mask identical)": (hub_dir("ViTMAEForPreTraining"), []),
        "ViTMAEForPreTraining B/16, norm_pix_loss": (hub_dir("ViTMAEForPreTraining"), ["--norm_pix_loss"]),
        "ViTMAEForPreTraining B/16 after to-flax + to-hf": (hub_dir("ViTMAEForPreTraining", round_trip=True), []),
        "ViTMAEForPreTraining B/16, qkv_bias false": (hub_dir("ViTMAEForPreTraining", qkv_bias=False), []),
        "ViTMAEModel B/16 (cls features)": (hub_dir("ViTMAEModel"), []),
        "ViTModel B/16 with its pooler (pooler_output)": (hub_dir("ViTModel"), []),
        "ViTForImageClassification B/16, 1000 classes": (hub_dir("ViTForImageClassification", num_labels=1000), []),
    },
}
SHOWN = {"max abs diff": ("max |pred diff|", "max |feature diff|", "max |logit diff|"),
         "max rel diff": ("max |feature diff| / max |feature|", "max |logit diff| / max |logit|"),
         "loss rel diff": ("|loss diff| / |loss|",), "top-1 agreement": ("top-1 agreement",)}  # fmt: skip


def measure(name: str, make: Maker, flags: list[str], batch_size: int, scratch: Path) -> dict[str, str]:
    """One row: the checkpoint written, `main.py parity` run on it, its figures as table cells."""
    args = parity.parser().parse_args(["--checkpoint", str(make(scratch)), "--batch_size", str(batch_size), *flags])
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
    parser.add_argument("--table", choices=sorted(TABLES), default=None, help="one table (default: both)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all of the table)")
    args = parser.parse_args(argv)
    tables = [args.table] if args.table else list(TABLES)
    rows = {name: row for table in tables for name, row in TABLES[table].items()}
    names = args.rows.split(",") if args.rows else list(rows)
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; the rows are {list(rows)}")
    for table in tables:
        lines = ["| checkpoint | max abs diff | max rel diff | loss rel diff | top-1 agreement |", "|---|---|---|---|---|"]
        for name in (n for n in names if n in TABLES[table]):
            with tempfile.TemporaryDirectory() as scratch:
                cells = measure(name, *rows[name], args.batch_size, Path(scratch))
            lines.append(f"| {name} | " + " | ".join(cells.values()) + " |")
            print(lines[-1], flush=True)
        print(f"\n{table}:\n" + "\n".join(lines) + "\n", flush=True)


if __name__ == "__main__":
    main()
