"""The conversions themselves: torch state dict <-> Flax params, and any checkpoint -> params.

Each direction reads the architecture (given or inferred), checks every key and shape
against the Flax model in the input's own namespace (torch keys for a `.pth`, Flax
paths for params), and only then maps the arrays through the key table. Arrays stay
numpy with their dtype; the only arithmetic anywhere is the optional bicubic resampling
of the position tables for another image size.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import flax.linen as nn
import numpy as np

from convert.arch import Architecture, check_shapes, infer_architecture
from convert.hf_files import is_hf_source, read_hf
from convert.safe_load import load_torch_checkpoint
from convert.table import (
    ConversionError,
    Shape,
    flatten,
    heads_for,
    to_flax_array,
    to_torch_array,
    torch_key_and_shape,
    unflatten,
)
from semmae_jax import checkpoint
from semmae_jax.image_size import ImageSize, height_width, image_size, size_text
from semmae_jax.models.pos_embed import interpolate_pos_embed

log = logging.getLogger(__name__)
T = TypeVar("T")

# The position tables: the same names in the torch and the Flax layout.
POSITION_TABLES = ("pos_embed", "decoder_pos_embed")
# Meta entries a checkpoint carries on through conversions (`Loaded.meta`, `hf_files.HFCheckpoint.meta`).
CARRIED_META = ("transformers", "mask_ratio", "id2label")


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    model_name: str | None = None,
    *,
    img_size: ImageSize | None = None,
    hint: str | None = None,
    stated: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Flax params from a torch-layout state dict (prefixes already stripped).

    Args:
      state_dict: torch key -> numpy array (`load_torch_checkpoint`'s output).
      model_name: a registered name; inferred from the keys and shapes when None.
      img_size: resample the position tables (bicubic, cls row kept) to this image size.
      hint: a name the file suggests (MAE's `args.model`), used when it fits the shapes.
      stated: model fields a config beside the tensors states (`infer_architecture`).

    Returns:
      (params, model name, `create_model` overrides) such that
      `create_model(name, **overrides).apply({'params': params}, ...)` runs the checkpoint.
    """
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    arch = infer_architecture(shapes, model_name, hint=hint, stated=stated, requested_size=img_size)
    if img_size is not None:
        state_dict, arch = _resize_tables(state_dict, arch, img_size)
        shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    check_shapes(shapes, arch.torch_shapes(), arch)
    config = arch.config
    flat = {}
    for key, value in state_dict.items():
        heads = heads_for(key, config["num_heads"], config.get("decoder_num_heads", 0))
        path, array = to_flax_array(key, value, heads)
        flat[path] = np.ascontiguousarray(array)
    return unflatten(flat), arch.name, arch.overrides


def flax_to_torch(
    params: Mapping[str, Any], model_name: str | None = None, *, model_overrides: Mapping[str, Any] | None = None
) -> OrderedDict[str, np.ndarray]:
    """The original's state dict (numpy arrays, its key order) from Flax params.

    Args:
      params: the `params` collection (or a `{'params': ...}` variables dict).
      model_name: the registered name the params are checked against; inferred when None.
      model_overrides: the `create_model` overrides saved with the params; when given with
        `model_name` they are used as they are, otherwise read from the shapes.
    """
    flat = _flat_params(params)
    arch = _flax_architecture(flat, model_name, model_overrides)
    check_shapes({path: tuple(np.shape(v)) for path, v in flat.items()}, arch.flax_shapes(), arch)
    converted = dict(to_torch_array(path, np.asarray(value)) for path, value in flat.items())
    return OrderedDict((key, np.ascontiguousarray(converted[key])) for key in arch.torch_shapes())


class Loaded(NamedTuple):
    """A checkpoint read for a model: its params, model name, overrides, and the meta it carries."""

    params: dict[str, Any]
    name: str
    overrides: dict[str, Any]
    meta: dict[str, Any]  # transformers' class and config, `mask_ratio`, `id2label` (when the file had them)


def params_from_checkpoint(
    path: str | Path, model_name: str | None = None, *, img_size: ImageSize | None = None, trust_pickle: bool = False
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(params, model name, overrides) from any checkpoint `read_checkpoint` reads.

    What `--resume` / `--finetune` / `parts train --backbone` call.
    """
    params, name, overrides, _ = read_checkpoint(path, model_name, img_size=img_size, trust_pickle=trust_pickle)
    return params, name, overrides


def read_checkpoint(
    path: str | Path, model_name: str | None = None, *, img_size: ImageSize | None = None, trust_pickle: bool = False
) -> Loaded:
    """A `.pth` file, an orbax checkpoint directory, a transformers `save_pretrained`
    directory or a `.safetensors` file, read for a model.

    A `.pth` is converted in memory (safe loading, architecture inference, key check); a
    transformers checkpoint the same way, its `config.json` deciding what the shapes cannot
    (`convert.hf_files`); an orbax directory is read with its saved model name, overrides and
    meta (or inferred when it has none), checked the same way. The detected layout is logged;
    errors name the file.
    """
    if is_hf_source(path):
        hf = read_hf(path, trust_pickle)
        log.info("%s", hf.summary())
        converted = _named_errors(path, torch_to_flax, hf.state_dict, model_name, img_size=img_size, stated=hf.stated)
        return Loaded(*converted, hf.meta)
    if Path(path).is_dir():
        step = checkpoint.open_step(path)
        params, meta = step.params_and_meta()
        run_size = (step.json_item("config") or {}).get("input_size")  # a training run's
        converted = _named_errors(path, _checked_params, params, meta, model_name, img_size, run_size)
        return Loaded(*converted, {k: v for k, v in meta.items() if k in CARRIED_META})
    state_dict, info = load_torch_checkpoint(path, trust_pickle=trust_pickle)
    log.info("%s", info.summary())
    converted = _named_errors(path, torch_to_flax, state_dict, model_name, img_size=img_size, hint=info.args_model)
    return Loaded(*converted, {})


def _named_errors(path: str | Path, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err}") from err


def _checked_params(
    params: Mapping[str, Any], meta: Mapping[str, Any], model_name: str | None, img_size: ImageSize | None,
    run_size: ImageSize | None = None,
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Orbax params checked against their model: the saved one, the named one, or the inferred one
    (a training run's checkpoint: at the image size `run_size` its config states)."""
    flat = _flat_params(params)
    saved = meta.get("model")
    overrides = meta.get("model_overrides", {}) if model_name in (None, saved) else None
    arch = _flax_architecture(flat, model_name or saved, overrides, run_size)
    if img_size is not None:
        flat, arch = _resize_tables(flat, arch, img_size)
    check_shapes({p: tuple(np.shape(v)) for p, v in flat.items()}, arch.flax_shapes(), arch)
    return unflatten(flat), arch.name, arch.overrides


def _flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params as {'a/b/c': array}: from the `params` collection or a `{'params': ...}`
    variables dict, boxed (`nn.with_logical_partitioning`, as `model.init` returns them) or not."""
    if not isinstance(params, Mapping):
        raise ConversionError(
            f"expected Flax params (a mapping of module names to arrays, e.g. model.init(...)['params']), "
            f"got a {type(params).__name__}"
        )
    if "params" in params and isinstance(params["params"], Mapping):
        params = params["params"]
    flat = flatten(nn.meta.unbox(params))
    not_arrays = [path for path, leaf in flat.items() if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype"))]
    if not_arrays:
        leaf = flat[not_arrays[0]]
        raise ConversionError(f"not a params tree: {not_arrays[0]!r} is a {type(leaf).__name__}, not an array")
    return flat


def _flax_architecture(
    flat: Mapping[str, Any], model_name: str | None, overrides: Mapping[str, Any] | None,
    image_size: ImageSize | None = None,
) -> Architecture:
    """The given model as saved, or the one the params' shapes (seen in the torch layout) and the
    stated `image_size` imply."""
    if model_name is not None and overrides is not None:
        return Architecture(model_name, dict(overrides))
    stated = {} if image_size is None else {"img_size": image_size}
    return infer_architecture(_torch_shapes(flat), model_name, stated=stated)


def _torch_shapes(flat: Mapping[str, Any]) -> dict[str, Shape]:
    """The torch key and shape each Flax param maps to (params the table does not know are left out)."""
    shapes = {}
    for path, value in flat.items():
        with contextlib.suppress(KeyError):
            key, shape = torch_key_and_shape(path, np.shape(value))
            shapes[key] = shape
    return shapes


def _resize_tables(arrays: Mapping[str, Any], arch: Architecture, img_size: ImageSize) -> tuple[dict[str, Any],
                                                                                                 Architecture]:
    """Resample the position tables to `img_size` as MAE's `interpolate_pos_embed` (bicubic, cls kept)."""
    patch, img_size = arch.config["patch_size"], image_size(img_size)
    if any(side % patch for side in height_width(img_size)):
        raise ConversionError(f"--img_size {size_text(img_size)} is not a multiple of the patch size {patch}")
    old = tuple(side // patch for side in height_width(arch.config["img_size"]))
    new = tuple(side // patch for side in height_width(img_size))
    resized = dict(arrays)
    for name in POSITION_TABLES:
        if name in resized and old != new:
            resized[name] = interpolate_pos_embed(np.asarray(resized[name]), new, old_grid=old)
    if old != new:
        log.info("position tables resampled from a %dx%d to a %dx%d grid (img_size %s)", *old, *new,
                 size_text(img_size))
    return resized, arch.with_overrides(img_size=img_size)
