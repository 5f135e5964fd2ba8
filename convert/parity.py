"""`python main.py parity`: run a checkpoint in JAX and in a PyTorch reference, compare.

    python main.py parity --checkpoint X.pth [--model NAME] [--data_path DIR]
                          [--batch_size N] [--img_size N] [--norm_pix_loss]

The user's check that a converted release behaves as it did in PyTorch. The checkpoint
(a `.pth` or an orbax directory) is converted once; the PyTorch side gets the state dict
back from the converted params (bit for bit the file's tensors, see the round-trip
tests), so both sides run exactly the same weights:

- classifiers and encoders: timm's `VisionTransformer`; compared: logits (or pooled
  features), max abs and max relative difference, top-1 agreement;
- MAE pretraining models: transformers' `ViTMAEForPreTraining` with the same `noise`;
  compared: loss (relative), reconstruction `pred` (max abs), mask.

The batch is the first eval batch of `--data_path` (the project's eval transform) or a
fixed random one; with `--all_images`, classifiers run over the whole validation split
and the report adds each side's Acc@1 on the same images. Both sides compute in float32
(`jax.default_matmul_precision`). Exit status 1 when any difference is over its tolerance.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# timm and transformers (through `references`) load triton, which crashes the process when
# loaded after TensorFlow; the data pipeline imports TensorFlow, so this import comes first.
from convert import references  # isort: skip

import jax
import numpy as np
import torch

from convert.arch import full_config
from convert.cli import exit_on_error
from convert.core import flax_to_torch, params_from_checkpoint
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
    p.add_argument("--checkpoint", required=True, help="a .pth file or an orbax checkpoint directory")
    p.add_argument("--model", default=None, help="registered model name (default: inferred / from the meta)")
    p.add_argument("--data_path", default=None, help="dataset root: compare on its first eval batch")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--all_images", action="store_true", help="classifiers: the whole val split, with Acc@1 on both sides")
    p.add_argument("--img_size", type=int, default=None, help="resample the position tables to this image size")
    p.add_argument("--norm_pix_loss", action="store_true", help="MAE: per-patch normalised pixel targets")
    p.add_argument("--mask_ratio", type=float, default=0.75, help="MAE: fraction of patches removed")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference of logits / features / pred")
    p.add_argument("--loss_rtol", type=float, default=1e-5, help="max relative difference of the MAE loss")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch and of the MAE noise")
    p.add_argument("--trust-pickle", action="store_true", help="unpickle the .pth without the safety allow-list")
    return p


def main(argv: Sequence[str] | None = None) -> None:
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
    params, name, overrides = params_from_checkpoint(
        args.checkpoint, args.model, img_size=args.img_size, trust_pickle=args.trust_pickle
    )
    if model_family(name) == "mae":
        overrides = {**overrides, "norm_pix_loss": args.norm_pix_loss}
    config = full_config(name, **overrides)
    state_dict = flax_to_torch(params, name, model_overrides=overrides)
    batches = list(image_batches(args, config))
    count = sum(len(images) for images, _ in batches)
    print(f"model {name} {overrides}; {count} images of {config['img_size']}px from "
          f"{args.data_path or 'a seeded random batch'}")
    model = create_model(name, **overrides)
    with jax.default_matmul_precision("float32"), torch.no_grad():
        if model_family(name) == "mae":
            return mae_rows(model, params, state_dict, config, batches[0][0], args)
        return classifier_rows(model, params, state_dict, config, batches, args)


def classifier_rows(
    model: Any, params: Any, state_dict: Any, config: dict, batches: list[tuple[np.ndarray, Any]],
    args: argparse.Namespace,
) -> list[Row]:
    reference = references.load_numpy_state_dict(references.timm_classifier(config), state_dict)
    apply = jax.jit(model.apply)
    got = np.concatenate([np.asarray(apply({"params": params}, images)) for images, _ in batches])
    expected = np.concatenate([reference(_nchw(images)).numpy() for images, _ in batches])
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
    model: Any, params: Any, state_dict: Any, config: dict, images: np.ndarray, args: argparse.Namespace
) -> list[Row]:
    reference = references.hf_mae(config, mask_ratio=args.mask_ratio)
    references.load_numpy_state_dict(reference, references.pth_to_hf(state_dict))
    num_patches = (config["img_size"] // config["patch_size"]) ** 2
    noise = np.random.default_rng(args.seed + 1).random((len(images), num_patches), dtype=np.float32)
    out = reference(_nchw(images), noise=torch.from_numpy(noise))
    apply = jax.jit(functools.partial(model.apply, mask_ratio=args.mask_ratio))
    loss, pred, mask = (np.asarray(x) for x in apply({"params": params}, images, noise=noise))
    expected_loss = out.loss.item()
    return [
        Row("loss, JAX", float(loss)),
        Row("loss, PyTorch", expected_loss),
        Row("|loss diff| / |loss|", abs(float(loss) - expected_loss) / abs(expected_loss), args.loss_rtol),
        Row("max |pred diff|", np.abs(pred - out.logits.numpy()).max(), args.atol),
        Row("mask disagreements", float(np.sum(mask != out.mask.numpy())), 0.0),
    ]


def image_batches(args: argparse.Namespace, config: dict) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """([N, H, W, C] float32 normalised images, labels or None): the dataset's first eval batch
    (every batch with `--all_images`), or one seeded random batch without labels."""
    if args.data_path:
        yield from dataset_batches(args.data_path, args.batch_size, config["img_size"], args.all_images)
        return
    shape = (args.batch_size, config["img_size"], config["img_size"], config["in_chans"])
    yield np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32), None


def dataset_batches(
    data_path: str, batch_size: int, img_size: int, every_batch: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validation batches through the project's eval transform, padding dropped."""
    from semmae_jax.data import eval_batches, open_source  # imports TensorFlow: only now, after torch

    batches = eval_batches(open_source(data_path, "val"), batch_size=batch_size, img_size=img_size)
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
