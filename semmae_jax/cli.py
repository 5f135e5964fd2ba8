"""`python main.py COMMAND ...`: one entry point for every job.

Each command lives in its own module with a `main(argv)` that owns its flags; this
module only picks the command and imports it lazily, so that `--help` and light
commands do not pay for TensorFlow or PyTorch start-up.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# command -> ("module:function(argv)", one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("semmae_jax.train.pretrain:main", "MAE / SemMAE pretraining (no flags: the embedded demo)"),
    "finetune": ("semmae_jax.train.finetune:main", "fine-tune (or --eval) a ViT classifier"),
    "eval": ("semmae_jax.train.finetune:eval_main", "shorthand for `finetune --eval`"),
    "linprobe": ("semmae_jax.train.linprobe:main", "linear probing of a pretrained encoder (LARS, BatchNorm head)"),
    "launch": ("semmae_jax.launch:main", "run a command as N local processes joined by jax.distributed"),
    "convert": ("convert.cli:main", "PyTorch .pth <-> orbax checkpoint conversion (to-flax, to-torch)"),
    "parity": ("convert.parity:main", "compare a checkpoint's outputs in JAX and in the PyTorch reference"),
    "parts train": ("semmae_jax.train.parts:train_main", "stage 1: learn semantic parts on a frozen ViT"),
    "parts export": ("semmae_jax.train.parts_tools:export_main", "stage 1: write a PNG part map per image (resumable)"),
    "parts show": ("semmae_jax.train.parts_tools:show_main", "stage 1: a picture of images with their learned parts"),
    "parts eval": ("semmae_jax.train.parts_tools:eval_main", "stage 1: mIoU / ARI of the parts and two baselines"),
    "parts import-semmae": ("semmae_jax.data.import_semmae:main", "the original's released part data -> PNG part maps"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: python main.py COMMAND [flags]   (COMMAND --help for its flags)\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    command = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else argv[0]
    rest = argv[len(command.split()) :]
    if command not in COMMANDS:
        print(f"main.py: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name, function = COMMANDS[command][0].split(":")
    entry = getattr(importlib.import_module(module_name), function)
    entry(rest, **JOBS.get(command, {}))


def load_checkpoint_params(path: str, model_name: str | None, img_size: int) -> Any:
    """Params from a `.pth` (converted in memory) or an orbax checkpoint, checked against
    `model_name` (or as saved, when None), position tables resized to `img_size`.

    The glue between the jobs and the converter: the library never imports `convert`.
    """
    from convert import params_from_checkpoint

    params, _, _ = params_from_checkpoint(path, model_name, img_size=img_size)
    return params


def load_backbone_params(path: str, img_size: int | None) -> tuple[Any, str, dict[str, Any]]:
    """A frozen ViT encoder for stage 1 from a `.pth` (MAE, DINO, iBOT) or an orbax checkpoint:
    (params, registered model name, overrides), position table resized to `img_size`."""
    from convert.backbones import backbone_params

    return backbone_params(path, img_size=img_size)


def load_torch_optimizer(path: str, model_name: str) -> Any:
    """The AdamW state of an original pretraining or fine-tuning `.pth` (None for anything else):
    what lets `pretrain` / `finetune --resume X.pth` continue the run the file was saved from."""
    if Path(path).is_dir():
        return None
    from convert.optimizer import torch_adam_state

    return torch_adam_state(path, model_name)


# Jobs that read checkpoints (`--resume`, `--finetune`, `--backbone`), with their readers.
JOBS: dict[str, dict[str, Any]] = {
    "pretrain": {"load_params": load_checkpoint_params, "load_optimizer": load_torch_optimizer},
    "finetune": {"load_params": load_checkpoint_params, "load_optimizer": load_torch_optimizer},
    "eval": {"load_params": load_checkpoint_params},
    "linprobe": {"load_params": load_checkpoint_params},
    "parts train": {"load_params": load_backbone_params},
}
