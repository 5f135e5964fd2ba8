"""`python main.py parity`: run a checkpoint in JAX and in a PyTorch reference, compare.

    python main.py parity --checkpoint X.pth|HF_DIR [--model NAME] [--data_path DIR]
                          [--batch_size N] [--img_size SIDE | HEIGHT WIDTH] [--norm_pix_loss]
    python main.py parity --train pretrain|finetune|linprobe ...   (training: `convert.parity.training`)

The user's check that a converted release behaves as it did in PyTorch. The checkpoint
(a `.pth`, an orbax directory, a transformers directory or `.safetensors`) is converted
once. A transformers directory runs in transformers' own class, loaded by transformers
from that directory; otherwise the PyTorch side gets the state dict back from the
converted params (bit for bit the file's tensors, see the round-trip tests), so both
sides run exactly the same weights:

- classifiers and encoders: timm's `VisionTransformer` (or the directory's
  `ViTForImageClassification` / `ViTModel` / `ViTMAEModel`); compared: logits (or the
  cls features after the final norm; ViTModel's `pooler_output` when it has its pooler), max abs
  and max relative difference, top-1 agreement;
- MAE pretraining models: transformers' `ViTMAEForPreTraining` with the same `noise`
  and mask ratio (the config's unless `--mask_ratio`); compared: loss (relative),
  reconstruction `pred` (max abs), mask.

The batch is the first eval batch of `--data_path` (the project's eval transform) or a
fixed random one; with `--all_images`, classifiers run over the whole validation split
and the report adds each side's Acc@1 on the same images. Both sides compute in float32
(`jax.default_matmul_precision`). Exit status 1 when any difference is over its tolerance.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# timm and transformers (through `references`) load triton, which crashes the process when
# loaded after TensorFlow; the data pipeline imports TensorFlow, so this import comes first.
from convert.parity import references  # isort: skip

import jax
import numpy as np
import torch

from convert.arch import Architecture
from convert.cli import exit_on_error
from convert.core import Loaded, read_checkpoint
from convert.hf_files import is_hf_source
from semmae_jax.image_size import ImageSize, height_width, image_size, size_text
from semmae_jax.models import create_model, model_family


@dataclass(frozen=True)
class Row:
    """One line of the report: a measured value and, when it is checked, its limit."""

    name: str
    value: float
    limit: float | None = None
    at_least: bool = False  # the limit is a minimum (agreement) instead of a maximum (error)

    @property
    def ok(self) -> bool:
        if self.limit is None:
            return True
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python main.py parity", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", required=True,
        help="a .pth file, an orbax checkpoint directory, a transformers save_pretrained directory or a .safetensors",
    )
    p.add_argument("--model", default=None, help="registered model name (default: inferred / from the meta)")
    p.add_argument("--data_path", default=None, help="dataset root: compare on its first eval batch")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--all_images", action="store_true", help="classifiers: the whole val split, with Acc@1 on both sides")
    p.add_argument("--img_size", type=int, nargs="+", default=None, metavar="SIDE",
                   help="resample the position tables to this image size (one side, or HEIGHT WIDTH)")
    p.add_argument(
        "--norm_pix_loss", action="store_true", help="MAE: per-patch normalised pixel targets (default: the checkpoint's)"
    )
    p.add_argument(
        "--mask_ratio", type=float, default=None,
        help="MAE: fraction of patches removed (default: the checkpoint's config, else 0.75)",
    )
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference of logits / features / pred")
    p.add_argument("--loss_rtol", type=float, default=1e-5, help="max relative difference of the MAE loss")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch and of the MAE noise")
    p.add_argument("--trust-pickle", action="store_true", help="unpickle the .pth without the safety allow-list")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg == "--train" or arg.startswith("--train=") for arg in argv):
        from convert.parity import training as train_parity  # training-trajectory parity: its own flags

        return train_parity.main(argv)
    args = parser().parse_args(argv)
    rows = exit_on_error(compare, args)
    print(format_rows(rows))
    failed = [row.name for row in rows if not row.ok]
    if failed:
        print(f"parity FAILED: {', '.join(failed)}")
        raise SystemExit(1)
    print("parity OK")


def compare(args: argparse.Namespace) -> list[Row]:
    """Load, build both models, run them on one batch, and measure the differences."""
    size = None if args.img_size is None else image_size(args.img_size)
    loaded = read_checkpoint(args.checkpoint, args.model, img_size=size, trust_pickle=args.trust_pickle)
    overrides = dict(loaded.overrides)
    if model_family(loaded.name) == "mae" and args.norm_pix_loss:
        overrides["norm_pix_loss"] = True
    arch = Architecture(loaded.name, overrides)
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else loaded.meta.get("mask_ratio", 0.75)
    batches = list(image_batches(args, arch.config))
    count = sum(len(images) for images, _ in batches)
    print(f"model {arch}; {count} images of {size_text(arch.config['img_size'])}px from "
          f"{args.data_path or 'a seeded random batch'}")
    model = create_model(arch.name, **arch.overrides)
    with jax.default_matmul_precision("float32"), torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
        reference, hf_class = reference_model(args.checkpoint, loaded, arch, scratch, resampled=args.img_size is not None)
        print(f"reference: {f'transformers {hf_class}' if hf_class else 'timm VisionTransformer'}")
        if arch.family == "mae":
            reference.config.mask_ratio, reference.config.norm_pix_loss = mask_ratio, arch.config["norm_pix_loss"]
            return mae_rows(model, loaded.params, reference, arch.config, batches[0][0], args, mask_ratio)
        forward = references.classifier_forward(reference, hf_class)
        return classifier_rows(model, loaded.params, forward, arch.config, batches, args)


def reference_model(
    checkpoint: str, loaded: Loaded, arch: Architecture, scratch: str, *, resampled: bool
) -> tuple[torch.nn.Module, str | None]:
    """(the PyTorch model, its transformers class or None for timm) that runs the checkpoint.

    A transformers directory runs in its own class, read by transformers from the directory
    itself (unless its position tables were resampled). Anything else runs the weights the
    converter gives back (bit for bit the file's): timm for classifiers and encoders,
    transformers' ViTMAEForPreTraining for MAE (and ViTModel for an encoder with its pooler,
    which timm lacks), from a directory written by `to-hf`'s writer.
    """
    hf_class = loaded.meta.get("transformers", {}).get("class")
    if Path(checkpoint).is_dir() and is_hf_source(checkpoint) and not resampled:
        return references.hf_pretrained(checkpoint, hf_class), hf_class
    return references.reference_from_params(loaded.params, arch, scratch, loaded.meta)


def classifier_rows(
    model: Any, params: Any, forward: Callable[[torch.Tensor], np.ndarray], config: dict,
    batches: list[tuple[np.ndarray, Any]], args: argparse.Namespace,
) -> list[Row]:
    apply = jax.jit(model.apply)
    got = np.concatenate([np.asarray(apply({"params": params}, images)) for images, _ in batches])
    expected = np.concatenate([forward(_nchw(images)) for images, _ in batches])
    what = "logit" if config["num_classes"] else "feature"
    diff = np.abs(got - expected).max()
    rows = [
        Row(f"max |{what} diff|", diff, args.atol),
        Row(f"max |{what} diff| / max |{what}|", diff / np.abs(expected).max()),
    ]
    if config["num_classes"]:
        rows.append(Row("top-1 agreement", float(np.mean(got.argmax(-1) == expected.argmax(-1))), 1.0, at_least=True))
    if batches[0][1] is not None:
        labels = np.concatenate([labels for _, labels in batches])
        rows += [Row("Acc@1 % JAX", 100.0 * float(np.mean(got.argmax(-1) == labels))),
                 Row("Acc@1 % PyTorch", 100.0 * float(np.mean(expected.argmax(-1) == labels)))]
    return rows


def mae_rows(
    model: Any, params: Any, reference: torch.nn.Module, config: dict, images: np.ndarray,
    args: argparse.Namespace, mask_ratio: float,
) -> list[Row]:
    num_patches = math.prod(side // config["patch_size"] for side in height_width(config["img_size"]))
    noise = np.random.default_rng(args.seed + 1).random((len(images), num_patches), dtype=np.float32)
    out = reference(_nchw(images), noise=torch.from_numpy(noise))
    apply = jax.jit(functools.partial(model.apply, mask_ratio=mask_ratio))
    loss, pred, mask = (np.asarray(x) for x in apply({"params": params}, images, noise=noise))
    expected_loss = out.loss.item()
    return [
        Row("loss, JAX", float(loss)),
        Row("loss, PyTorch", expected_loss),
        Row("|loss diff| / |loss|", abs(float(loss) - expected_loss) / abs(expected_loss), args.loss_rtol),
        Row("max |pred diff|", np.abs(pred - out.logits.numpy()).max(), args.atol),
        Row("mask disagreements", float(np.sum(mask != out.mask.numpy())), 0.0),
        Row("masked fraction", float(mask.mean())),
    ]


def image_batches(args: argparse.Namespace, config: dict) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """([N, H, W, C] float32 normalised images, labels or None): the dataset's first eval batch
    (every batch with `--all_images`), or one seeded random batch without labels."""
    if args.data_path:
        yield from dataset_batches(args.data_path, args.batch_size, config["img_size"], args.all_images)
        return
    shape = (args.batch_size, *height_width(config["img_size"]), config["in_chans"])
    yield np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32), None


def dataset_batches(
    data_path: str, batch_size: int, img_size: ImageSize, every_batch: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validation batches through the project's eval transform, padding dropped."""
    from semmae_jax.data import eval_batches, open_source  # imports TensorFlow: only now, after torch

    batches = eval_batches(open_source(data_path, "val"), process_batch=batch_size, img_size=img_size)
    for batch in batches if every_batch else itertools.islice(batches, 1):
        real = np.asarray(batch["mask"], bool)  # False on padding
        yield np.asarray(batch["image"], np.float32)[real], np.asarray(batch["label"])[real]


def format_rows(rows: Sequence[Row]) -> str:
    width = max(len(row.name) for row in rows)
    lines = [f"{'check':<{width}}  {'value':>12}  {'tolerance':>12}  ok"]
    for row in rows:
        limit = "-" if row.limit is None else ("≥ " if row.at_least else "≤ ") + f"{row.limit:.3g}"
        status = "-" if row.limit is None else ("yes" if row.ok else "NO")
        lines.append(f"{row.name:<{width}}  {row.value:>12.6g}  {limit:>12}  {status}")
    return "\n".join(lines)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
