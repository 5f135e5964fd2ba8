"""`python main.py COMMAND ...`: one entry point for every job.

Each command lives in its own module with a `main(argv)` that owns its flags; this
module only picks the command and imports it lazily, so that `--help` and light
commands do not pay for TensorFlow or PyTorch start-up. Jobs that read checkpoints get
one `convert.reader.ConverterReader` (a `checkpoint.WeightsReader`): the glue between
the jobs and the converter.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from semmae_jax.runtime import host_memory

# command -> ("module:function(argv)", one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("semmae_jax.jobs.pretrain:main", "MAE / SemMAE pretraining (no flags: the embedded demo)"),
    "finetune": ("semmae_jax.jobs.finetune:main", "fine-tune (or --eval) a ViT classifier"),
    "eval": ("semmae_jax.jobs.finetune:eval_main", "shorthand for `finetune --eval`"),
    "linprobe": ("semmae_jax.jobs.linprobe:main", "linear probing of a pretrained encoder (LARS, BatchNorm head)"),
    "launch": ("semmae_jax.jobs.launch:main", "run a command as N local processes joined by jax.distributed"),
    "convert": ("convert.cli:main", "PyTorch .pth <-> orbax checkpoint conversion (to-flax, to-torch)"),
    "parity": ("convert.parity.forward:main", "compare a checkpoint's outputs in JAX and in the PyTorch reference"),
    "parts train": ("semmae_jax.jobs.parts:train_main", "stage 1: learn semantic parts on a frozen ViT"),
    "parts export": ("semmae_jax.jobs.parts_tools:export_main", "stage 1: write a PNG part map per image (resumable)"),
    "parts show": ("semmae_jax.jobs.parts_tools:show_main", "stage 1: a picture of images with their learned parts"),
    "parts eval": ("semmae_jax.jobs.parts_tools:eval_main", "stage 1: mIoU / ARI of the parts and two baselines"),
    "visualize": ("semmae_jax.jobs.visualize:main", "a checkpoint's reconstructions and SemMAE's masks of given images"),
    "features": ("semmae_jax.jobs.features:features_main", "encoder features of a dataset split as an .npz"),
    "knn": ("semmae_jax.jobs.features:knn_main", "weighted k-NN accuracy of encoder features (DINO's protocol)"),
    "prepare": ("semmae_jax.jobs.prepare:main", "pack an image folder (and its part maps) into TFRecord shards for "
                "--data_path; --stats: each band's mean and std, stored with the dataset"),
    "parts import-semmae": ("semmae_jax.jobs.parts_import:main", "the original's released part data -> PNG part maps"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: python main.py COMMAND [flags]   (COMMAND --help for its flags)\n\ncommands:\n" + "\n".join(lines)


# What the `torch` extra installs: a command whose module needs it says so in one line on a core install.
TORCH_SIDE = frozenset({"torch", "torchvision", "timm", "transformers"})

# Commands whose jobs read checkpoints (`--resume`, `--finetune`, `--backbone`, `--checkpoint`): they get the converter's reader.
READS_CHECKPOINTS = frozenset({"pretrain", "finetune", "eval", "linprobe", "parts train", "visualize", "features",
                               "knn"})


def main(argv: Sequence[str] | None = None) -> None:
    """Run `argv`'s command; with no `argv` (a program's own command line) first restart the
    process with malloc on huge pages (`host_memory`), once."""
    if argv is None:
        host_memory.restart_with_huge_pages()
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
    try:
        entry = getattr(importlib.import_module(module_name), function)
    except ModuleNotFoundError as missing:
        if missing.name not in TORCH_SIDE:
            raise
        raise SystemExit(f"main.py {command}: needs the PyTorch side ({missing.name} is not installed): "
                         "pip install 'semmae-jax[torch]'") from missing
    if command in READS_CHECKPOINTS:
        from convert.reader import ConverterReader  # the glue: the library never imports convert

        entry(rest, ConverterReader())
    else:
        entry(rest)
