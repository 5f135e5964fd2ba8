"""`python main.py COMMAND ...`: one entry point for every job.

Each command lives in its own module with a `main(argv)` that owns its flags; this
module only picks the command and imports it lazily, so that `--help` and light
commands do not pay for TensorFlow or PyTorch start-up.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module with `main(argv)`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("convert.cli", "PyTorch .pth <-> orbax checkpoint conversion (to-flax, to-torch)"),
    "parity": ("convert.parity", "compare a checkpoint's outputs in JAX and in the PyTorch reference"),
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
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"main.py: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[command][0])
    module.main(rest)
