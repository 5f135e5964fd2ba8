"""`python -m convert` / `python main.py convert`: .pth / transformers <-> orbax checkpoint conversion.

    python -m convert to-flax IN OUT_DIR [--model NAME] [--img_size SIDE | HEIGHT WIDTH] [--trust-pickle]
    python -m convert to-torch CKPT OUT.pth [--model NAME] [--format pth|safetensors]
    python -m convert to-hf CKPT OUT_DIR [--model NAME]

`to-flax` reads a `.pth`, a transformers `save_pretrained` directory or a `.safetensors`
file and writes the params with `semmae_jax.checkpoint.save_params` (the layout every
job loads) and the meta `{'model', 'model_overrides', 'source'}` (plus transformers'
class and config, `mask_ratio`, `id2label` when the source had them); `to-torch` writes
`{'model': state_dict}` in the original's key order, loadable with
`torch.load(weights_only=True)`, or that state dict as safetensors; `to-hf` writes
`config.json` + `model.safetensors` in the hub's layout (`from_pretrained` loads it).
Every verb reads any checkpoint `convert.read_checkpoint` reads. A file that cannot be
converted ends the command with one line of error and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import safetensors.numpy

from convert.arch import Architecture
from convert.core import flax_to_torch, read_checkpoint
from convert.hf_files import write_hf
from convert.safe_load import save_torch_checkpoint
from convert.table import ConversionError
from semmae_jax.checkpoint import save_params
from semmae_jax.image_size import image_size

T = TypeVar("T")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True, metavar="{to-flax,to-torch,to-hf}")
    to_flax = verbs.add_parser("to-flax", help="a PyTorch .pth or transformers checkpoint -> an orbax directory")
    to_flax.add_argument(
        "source",
        help="the .pth file (MAE/SemMAE, timm, DINO/iBOT layout), a transformers save_pretrained directory, "
        "or a .safetensors file",
    )
    to_flax.add_argument("output", help="the orbax checkpoint directory to write")
    to_flax.add_argument("--model", default=None, help="registered model name (default: inferred from the shapes)")
    to_flax.add_argument("--img_size", type=int, nargs="+", default=None, metavar="SIDE",
                         help="resample the position tables to this image size (one side, or HEIGHT WIDTH); a "
                              "non-square table that no config describes is read at this size")
    to_flax.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle without the safety allow-list: runs any code in the file; only for trusted files",
    )
    to_torch = verbs.add_parser("to-torch", help="a checkpoint -> the original / timm layout (.pth or safetensors)")
    to_torch.add_argument("source", help="the orbax checkpoint directory (root or one step), or any to-flax source")
    to_torch.add_argument("output", help="the file to write")
    to_torch.add_argument("--model", default=None, help="registered model name (default: the checkpoint's meta)")
    to_torch.add_argument(
        "--format", choices=("pth", "safetensors"), default="pth", help="{'model': state_dict} .pth, or safetensors"
    )
    to_hf = verbs.add_parser("to-hf", help="a checkpoint -> a transformers save_pretrained directory (hub layout)")
    to_hf.add_argument("source", help="the orbax checkpoint directory (root or one step), or any to-flax source")
    to_hf.add_argument("output", help="the directory to write config.json and model.safetensors into")
    to_hf.add_argument("--model", default=None, help="registered model name (default: the checkpoint's meta)")
    return p


def to_flax(args: argparse.Namespace) -> None:
    _refuse_non_empty(args.output)
    loaded = read_checkpoint(args.source, args.model, img_size=args.img_size, trust_pickle=args.trust_pickle)
    meta = {"model": loaded.name, "model_overrides": loaded.overrides, "source": str(args.source), **loaded.meta}
    step_dir = save_params(args.output, loaded.params, meta=meta)
    print(f"wrote {step_dir}: model {loaded.name} overrides {loaded.overrides}")


def to_torch(args: argparse.Namespace) -> None:
    loaded = read_checkpoint(args.source, args.model)
    state_dict = flax_to_torch(loaded.params, loaded.name, model_overrides=loaded.overrides)
    if args.format == "safetensors":
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        safetensors.numpy.save_file(dict(state_dict), args.output, metadata={"format": "pt"})
    else:
        save_torch_checkpoint(args.output, state_dict)
    print(f"wrote {args.output}: {len(state_dict)} tensors of model {loaded.name} overrides {loaded.overrides}")


def to_hf(args: argparse.Namespace) -> None:
    _refuse_non_empty(args.output)
    loaded = read_checkpoint(args.source, args.model)
    arch = Architecture(loaded.name, loaded.overrides)
    state_dict = flax_to_torch(loaded.params, loaded.name, model_overrides=loaded.overrides)
    hf_class = write_hf(args.output, state_dict, arch, loaded.meta)
    print(f"wrote {args.output}: transformers {hf_class} (config.json, model.safetensors) of model {arch}")


def _refuse_non_empty(output: str) -> None:
    if Path(output).exists() and (not Path(output).is_dir() or any(Path(output).iterdir())):
        raise ConversionError(f"{output} exists and is not empty; choose a new output directory")


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
    flags = parser()
    args = flags.parse_args(argv)
    if getattr(args, "img_size", None) is not None:
        try:
            args.img_size = image_size(args.img_size)
        except ValueError as error:
            flags.error(f"--img_size: {error}")
    exit_on_error({"to-flax": to_flax, "to-torch": to_torch, "to-hf": to_hf}[args.verb], args)
