"""`python -m convert` / `python main.py convert`: .pth <-> orbax checkpoint conversion.

    python -m convert to-flax IN.pth OUT_DIR [--model NAME] [--img_size N] [--trust-pickle]
    python -m convert to-torch IN_DIR OUT.pth [--model NAME]

`to-flax` writes the params with `semmae_jax.checkpoint.save_params` (the layout every
job loads) and the meta `{'model', 'model_overrides', 'source'}`; `to-torch` writes
`{'model': state_dict}` in the original's key order, loadable with
`torch.load(weights_only=True)`. A file that cannot be converted ends the command with
one line of error and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from convert.core import flax_to_torch, params_from_checkpoint
from convert.safe_load import save_torch_checkpoint
from convert.table import ConversionError
from semmae_jax.checkpoint import save_params

T = TypeVar("T")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True, metavar="{to-flax,to-torch}")
    to_flax = verbs.add_parser("to-flax", help="a PyTorch .pth -> an orbax checkpoint directory")
    to_flax.add_argument("source", help="the .pth file (MAE/SemMAE, timm, DINO/iBOT layout)")
    to_flax.add_argument("output", help="the orbax checkpoint directory to write")
    to_flax.add_argument("--model", default=None, help="registered model name (default: inferred from the shapes)")
    to_flax.add_argument("--img_size", type=int, default=None, help="resample the position tables to this image size")
    to_flax.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle without the safety allow-list: runs any code in the file; only for trusted files",
    )
    to_torch = verbs.add_parser("to-torch", help="an orbax checkpoint directory -> a PyTorch .pth")
    to_torch.add_argument("source", help="the orbax checkpoint directory (root or one step)")
    to_torch.add_argument("output", help="the .pth file to write")
    to_torch.add_argument("--model", default=None, help="registered model name (default: the checkpoint's meta)")
    return p


def to_flax(args: argparse.Namespace) -> None:
    if Path(args.output).exists() and any(Path(args.output).iterdir()):
        raise ConversionError(f"{args.output} exists and is not empty; choose a new output directory")
    params, name, overrides = params_from_checkpoint(
        args.source, args.model, img_size=args.img_size, trust_pickle=args.trust_pickle
    )
    meta = {"model": name, "model_overrides": overrides, "source": str(args.source)}
    step_dir = save_params(args.output, params, meta=meta)
    print(f"wrote {step_dir}: model {name} overrides {overrides}")


def to_torch(args: argparse.Namespace) -> None:
    params, name, overrides = params_from_checkpoint(args.source, args.model)
    state_dict = flax_to_torch(params, name, model_overrides=overrides)
    save_torch_checkpoint(args.output, state_dict)
    print(f"wrote {args.output}: {len(state_dict)} tensors of model {name} overrides {overrides}")


@contextlib.contextmanager
def notes_on_stdout() -> Iterator[None]:
    """Show the converter's notes (inferred model, resampled tables) on stdout for one command."""
    logger = logging.getLogger("convert")
    handler = logging.StreamHandler(sys.stdout)
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a library may have given the root logger a handler: no duplicates
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def exit_on_error(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with notes shown; a checkpoint that cannot be converted ends the process with
    one line and status 1."""
    with notes_on_stdout():
        try:
            return fn(*args)
        except (ConversionError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    exit_on_error({"to-flax": to_flax, "to-torch": to_torch}[args.verb], args)
