"""Reading and writing PyTorch `.pth` files without running the code a pickle may carry.

`torch.load(weights_only=True)` rebuilds only tensors and plain containers; anything
else must be allow-listed. MAE / SemMAE training checkpoints (`{'model', 'optimizer',
'epoch', 'scaler', 'args'}`) need one more global, `argparse.Namespace`; a few forks
also store numpy scalars. `SAFE_GLOBALS` lists exactly these, each with the reason it
cannot run code; a file that needs anything else is refused with a one-line message
naming the global. `trust_pickle=True` (the CLI's `--trust-pickle`) is the only way
to unpickle such a file, and it prints a warning first: there is no silent fallback.

Tensors become numpy arrays with their dtype kept: bfloat16 travels as its raw 16 bits
(viewed as `ml_dtypes.bfloat16`), never through float32, so conversions are bit exact.

The state dict is found inside the usual wrappers (`model` for MAE, `state_dict` for
iBOT releases, `teacher` for DINO / iBOT training files) and the `module.` (DDP) and
`backbone.` (DINO / iBOT) prefixes are stripped; what was stripped or dropped is
reported in `CheckpointInfo`, never silently.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from convert.table import ConversionError

if TYPE_CHECKING:
    import torch

# Where the state dict sits in a checkpoint, in order of preference.
WRAPPERS = ("model", "state_dict", "teacher")
# Key prefixes added by wrappers of the model: DDP's `module.`, DINO / iBOT's `backbone.`.
PREFIXES = ("module.", "backbone.")
# Keys of a self-supervised backbone that are not part of the ViT (iBOT's mask token).
EXTRA_KEYS = ("masked_embed",)


def _safe_globals() -> list[Any]:
    """The globals, beyond torch's own allow-list, that MAE-family checkpoints need.

    - `argparse.Namespace`: the `args` of MAE / SemMAE / DINO / iBOT training files. Its
      reconstruction only sets attributes on an empty namespace; it calls nothing.
    - numpy scalars (`numpy.core.multiarray.scalar` as numpy 1.x pickles it and
      `numpy._core.multiarray.scalar` as numpy 2.x does), `numpy.dtype`, and the classes
      of the numeric dtypes (the unpickler's BUILD step sets a dtype's state and checks
      its class): forks store metrics and arguments as `np.float64` / `np.int64`.
      `dtype(...)` only builds a type descriptor; `scalar(dtype, data)` only wraps bytes
      in a numpy scalar (numpy itself refuses the object dtype there). None of them
      imports or calls anything the file names.
    numpy arrays (`_reconstruct`, `ndarray`) are not allowed: no checkpoint of this family
    holds one, so they stay refused rather than widen the surface.
    """
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    numeric = [np.dtype(t).__class__ for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")]
    return [
        argparse.Namespace,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *numeric,
    ]


@dataclass(frozen=True)
class CheckpointInfo:
    """What `load_torch_checkpoint` found around the state dict, and what it removed."""

    path: str
    wrapper: str | None = None  # the key the state dict was under ('model', ...), None if bare
    other_entries: tuple[str, ...] = ()  # the checkpoint's other top-level keys ('optimizer', 'args', ...)
    prefixes: tuple[str, ...] = ()  # key prefixes stripped ('module.', 'backbone.')
    dropped: tuple[str, ...] = ()  # keys left out (a DINO projection head, iBOT's masked_embed)
    epoch: int | None = None
    args_model: str | None = None  # MAE's `args.model`: a hint for the architecture
    trusted_pickle: bool = False

    def summary(self) -> str:
        """One line per fact, for the CLI."""
        lines = [f"read {self.path}" + (" (unrestricted unpickling: --trust-pickle)" if self.trusted_pickle else "")]
        if self.wrapper:
            others = f"; other entries ignored: {list(self.other_entries)}" if self.other_entries else ""
            lines.append(f"state dict taken from '{self.wrapper}'{others}")
        if self.prefixes:
            lines.append(f"key prefixes stripped: {list(self.prefixes)}")
        if self.dropped:
            lines.append(f"keys dropped (not part of the ViT): {list(self.dropped)}")
        if self.epoch is not None:
            lines.append(f"epoch {self.epoch}")
        if self.args_model:
            lines.append(f"args.model = {self.args_model}")
        return "\n".join(lines)


def load_torch_checkpoint(
    path: str | Path, trust_pickle: bool = False
) -> tuple[OrderedDict[str, np.ndarray], CheckpointInfo]:
    """The state dict of a `.pth` as numpy arrays, in file order, and what surrounded it.

    Args:
      path: a file written by `torch.save`: a bare state dict, `{'model': ...}`, an MAE
        training checkpoint, a DINO / iBOT release or training file.
      trust_pickle: unpickle without restrictions (runs any code the file holds); only
        for files from a trusted source. Prints a warning.

    Raises:
      ConversionError: one line naming the file: unreadable, truncated, not a checkpoint,
        refused global, or no ViT state dict inside.
    """
    state_dict, info, _ = load_training_checkpoint(path, trust_pickle)
    return state_dict, info


def load_training_checkpoint(
    path: str | Path, trust_pickle: bool = False
) -> tuple[OrderedDict[str, np.ndarray], CheckpointInfo, Mapping[str, Any] | None]:
    """`load_torch_checkpoint`'s (state dict, info) and the file's optimizer state dict.

    The optimizer entry is what MAE's `misc.save_model` stores under 'optimizer'
    (`torch.optim.Optimizer.state_dict()`: 'state' and 'param_groups', tensors left as
    they are); None when the file has none.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    raw = _unpickle(path, trust_pickle)
    state, info = _find_state_dict(raw, str(path))
    if trust_pickle:
        info = _with(info, trusted_pickle=True)
    optimizer = raw.get("optimizer") if info.wrapper else None
    return _to_numpy(state, path), info, optimizer if isinstance(optimizer, Mapping) else None


def _import_torch(path: Path) -> ModuleType:
    """torch, imported only when a `.pth` is read or written: the core install (no `torch` extra)
    reads orbax and safetensors checkpoints, and names the missing extra in one line here."""
    try:
        import torch
    except ImportError as err:
        raise ConversionError(f"{path}: a PyTorch .pth file needs torch, which is not installed: "
                              "pip install 'semmae-jax[torch]'") from err
    return torch


def _unpickle(path: Path, trust_pickle: bool) -> Any:
    torch = _import_torch(path)
    if trust_pickle:
        print(
            f"WARNING: --trust-pickle: unpickling {path} without restrictions runs any code it holds", file=sys.stderr
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            # Zip files are memory-mapped: entries never read (the optimizer state) cost no memory.
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch reports a bad file through many types; all mean "cannot read it"
        refused = None if trust_pickle else _refused_global(str(err))
        if refused:
            raise ConversionError(
                f"{path}: refused to unpickle '{refused}', which is not in the allow-list of harmless "
                "checkpoint globals; if you trust this file, pass --trust-pickle (it runs the file's code)"
            ) from err
        if _is_plain_pickle(path):
            raise ConversionError(
                f"{path}: a plain Python pickle, not a torch.save file: refused (unpickling it could run code); "
                "if you trust it, pass --trust-pickle, or load it yourself and torch.save its state dict"
            ) from err
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(err)}"
        ) from err


def _is_plain_pickle(path: str | Path) -> bool:
    """A pickle that is not torch's legacy format (which opens with protocol 2 and its magic number as LONG1)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" and head != b"\x80\x02\x8a\x0a"


def _refused_global(message: str) -> str | None:
    """The global torch's weights-only unpickler refused, read from its message."""
    match = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"but got <class '([^']+)'>", message)
    return match[1] if match else None


def _first_line(err: BaseException) -> str:
    """The informative line of a torch error: after 'WeightsUnpickler error:' when there is one."""
    text = str(err).partition("WeightsUnpickler error:")[2] or str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _find_state_dict(raw: Any, path: str) -> tuple[dict[str, Any], CheckpointInfo]:
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{path}: holds a {type(raw).__name__}, not a checkpoint dict")
    wrapper = next((w for w in WRAPPERS if isinstance(raw.get(w), Mapping)), None)
    state = raw[wrapper] if wrapper else raw
    others = tuple(k for k in raw if k != wrapper) if wrapper else ()
    args = raw.get("args") if wrapper else None
    epoch = raw.get("epoch") if wrapper else None
    info = CheckpointInfo(
        path,
        wrapper,
        others,
        epoch=int(epoch) if isinstance(epoch, (int, np.integer)) else None,
        args_model=getattr(args, "model", None) if isinstance(args, argparse.Namespace) else None,
    )
    return _strip(dict(state), info)


def _strip(state: dict[str, Any], info: CheckpointInfo) -> tuple[dict[str, Any], CheckpointInfo]:
    """Remove wrapper prefixes; keys outside a `backbone.` prefix belong to a head and are dropped."""
    prefixes, dropped = [], []
    for prefix in PREFIXES:
        if any(key.startswith(prefix) for key in state):
            prefixes.append(prefix)
            dropped += [key for key in state if not key.startswith(prefix)]
            state = {key[len(prefix) :]: v for key, v in state.items() if key.startswith(prefix)}
    dropped += [key for key in EXTRA_KEYS if key in state]
    state = {key: v for key, v in state.items() if key not in EXTRA_KEYS}
    return state, _with(info, prefixes=tuple(prefixes), dropped=tuple(dropped))


def _with(info: CheckpointInfo, **changes: Any) -> CheckpointInfo:
    return CheckpointInfo(**{**info.__dict__, **changes})


def _to_numpy(state: Mapping[str, Any], path: Path) -> OrderedDict[str, np.ndarray]:
    import torch

    out = OrderedDict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} of the state dict is a {type(value).__name__}, not a tensor")
        out[key] = tensor_to_numpy(value)
    return out


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array of the same dtype; bfloat16 through its raw bits."""
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """The inverse of `tensor_to_numpy`: same dtype, same bits."""
    import torch

    array = np.asarray(array)
    if not array.flags.writeable:  # torch.from_numpy wants memory it may write to
        array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def save_torch_checkpoint(path: str | Path, state_dict: Mapping[str, np.ndarray]) -> None:
    """Write `{'model': state_dict}` as MAE's released files hold it (loadable with weights_only=True)."""
    path = Path(path)
    torch = _import_torch(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": OrderedDict((k, numpy_to_tensor(v)) for k, v in state_dict.items())}, path)
