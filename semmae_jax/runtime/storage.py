"""Where a run writes: a local folder or any location `etils.epath` opens (`gs://bucket/run`, ...).

A cluster's hosts share no disk: a pod's checkpoints, lock and logs must go to object
storage, named by URL (`--output_dir gs://bucket/run`). `pathlib.Path` would turn that URL
into a local folder `./gs:/bucket/run` on every host, lost with the host. Every output
location therefore goes through `output_path`: URLs stay URLs (an `epath.Path`, which
orbax, TensorBoard and the log write through), a URL no installed backend can open is
one clear error, and local paths are made absolute. What only a local disk has (free
space, exclusive file creation) is asked only of local paths (`is_local`).
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath
from PIL import Image

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
    """Whether `path` names this host's file system (no `scheme://`)."""
    return "://" not in os.fspath(path)


def output_path(path: PathLike, flag: str = "--output_dir") -> epath.Path:
    """`path` as an `epath.Path`: absolute if local; a URL checked to be reachable by a backend.

    Raises ValueError (one line naming `flag`) for a URL whose scheme no backend serves
    (`s3://` without one installed, a typo), instead of writing a local folder of that name.
    """
    text = os.fspath(path)
    if is_local(text):
        return epath.Path(text).absolute()
    try:
        location = epath.Path(text)
        location.exists()  # the backend answers here, or says it cannot
    except Exception as error:  # backends raise their own types (KeyError, UnimplementedError, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{flag} {text}: no file system backend can open it ({reason}); give a local folder or "
                         "a URL epath serves (gs://...)") from error
    return location

def save_png(path: PathLike, image: np.ndarray) -> None:
    """Write a uint8 HWC picture, locally or to any epath location (a run's `gs://` output dir)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(image).save(f, format="PNG")
