"""Job configs: a typed dataclass per job, presets in `configs/NAME.py`, flags on top.

Field names are the original's flag names (`batch_size`, `blr`, `epochs`,
`mask_ratio`, ...), so `--NAME VALUE` overrides the field of the same name and the
original command lines work as written. A preset file defines `get_config()` returning
the job's dataclass (its docstring gives the command, the expected time and result).
Only flags actually given override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import importlib.util
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")
# The presets: the `configs` package next to `semmae_jax` (the checkout's, or the installed copy).
CONFIG_DIR = Path(str(importlib.resources.files("configs")))


def _flag_type(annotation: Any) -> tuple[type, bool]:
    """(base type, optional) of a field annotation such as `float | None`."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        base = [a for a in args if a is not type(None)]
        return base[0], True
    return annotation, False


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, aliases: dict[str, dict[str, Any]] | None = None) -> None:
    """One flag per dataclass field (`--name`; booleans also `--no-name`; a field with `metadata['bare']`
    also `--name` alone, meaning that value), help from `metadata['help']`.

    Defaults are suppressed so that `parse_args` holds only the flags given; `aliases`
    maps extra flag names to (field, value), e.g. `--cls_token` -> global_pool=False.
    """
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        base, optional = _flag_type(hints[field.name])
        help_text = _inherited_metadata(config_cls, field.name, "help") or ""
        flag = f"--{field.name}"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            if typing.get_origin(base) is tuple:  # tuple[float, ...]: a flag of several values, each of this type
                base = typing.get_args(base)[0]
            kind = (lambda v, b=base: None if v.lower() == "none" else b(v)) if optional else base
            choices = _inherited_metadata(config_cls, field.name, "choices")
            bare = _inherited_metadata(config_cls, field.name, "bare")  # the value of the flag given alone
            join = _inherited_metadata(config_cls, field.name, "join")  # several values held as one
            shape = {} if bare is None else {"nargs": "?", "const": bare}
            if join is not None:
                shape = {"nargs": "+", "action": _Joined, "join": join}
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=choices, help=help_text,
                                metavar=base.__name__.upper(), **shape)
    for flag, (dest, value) in (aliases or {}).items():
        parser.add_argument(flag, dest=dest, action="store_const", const=value, default=argparse.SUPPRESS, help=f"same as --{dest}={value}")


class _Joined(argparse.Action):
    """A flag of several values that its field holds as one (`--input_size 96 160` -> (96, 160));
    `join`'s ValueError is the flag's one-line error."""

    def __init__(self, *args: Any, join: Callable[[list[Any]], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.join = join

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, None if values == [None] else self.join(values))
        except ValueError as error:
            parser.error(f"{option_string}: {error}")


def _inherited_metadata(config_cls: type, name: str, key: str) -> Any:
    """A field's metadata entry, from the class or the nearest base that sets it.

    A job config redeclares a shared field to change its default without repeating
    the help text.
    """
    for cls in config_cls.__mro__:
        for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
            if f.name == name and key in f.metadata:
                return f.metadata[key]
    return None


def parse_job_config(
    argv: Sequence[str], config_cls: type[C], prog: str, description: str | None,
    default_preset: Callable[[argparse.Namespace], str | None] = lambda args: None,
    aliases: dict[str, tuple[str, Any]] | None = None,
) -> C:
    """`--config PRESET` (or `default_preset(flags)`), then the given flags on top."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="preset in configs/ (name or path)")
    add_config_flags(parser, config_cls, aliases)
    args = parser.parse_args(argv)
    preset = args.config or default_preset(args)
    try:
        config = apply_flags(load_preset(preset, config_cls) if preset else config_cls(), args)
        check_config(config)
    except (ValueError, FileNotFoundError, TypeError) as error:
        raise SystemExit(f"{prog}: error: {error}") from error
    return config


def check_config(config: Any) -> None:
    """Every `check()` the config's classes define (flag bases and the job's own), before anything starts."""
    for cls in type(config).__mro__:
        if "check" in vars(cls):
            vars(cls)["check"](config)


def one_line_errors(prog: str, job: Callable[..., Any], *args: Any) -> Any:
    """`job(*args)`; the errors a user can fix end it with one line, not a traceback."""
    try:
        return job(*args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"{prog}: error: {error}") from error


def load_preset(name_or_path: str, config_cls: type[C]) -> C:
    """`configs/NAME.py` (or a path) -> its `get_config()`, which must be a `config_cls`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
        raise FileNotFoundError(f"--config: no preset {name_or_path!r} (looked for {path}); presets: {', '.join(known)}")
    spec = importlib.util.spec_from_file_location(f"semmae_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if not isinstance(config, config_cls):
        raise TypeError(f"--config {path}: get_config() returned {type(config).__name__}, expected {config_cls.__name__}")
    return config


def apply_flags(config: C, flags: argparse.Namespace) -> C:
    """The preset with the given flags on top (unknown names were rejected by argparse)."""
    given = {k: v for k, v in vars(flags).items() if k in {f.name for f in dataclasses.fields(config)}}
    # A field that follows another (`FOLLOWS` of the config's classes: the input size follows the model, a
    # preset's global batch gives way to a per-device one) is reset when only its leader is given.
    follows = {name: leader for cls in type(config).__mro__ for name, leader in vars(cls).get("FOLLOWS", {}).items()}
    reset = {name: None for name, leader in follows.items() if leader in given and name not in given}
    return dataclasses.replace(config, **reset, **given)


def field(default: Any, help: str | None = None, **metadata: Any) -> Any:
    """A dataclass field with its flag's help text (None: inherited from a base's field)."""
    return dataclasses.field(default=default, metadata=({"help": help} if help else {}) | metadata)
