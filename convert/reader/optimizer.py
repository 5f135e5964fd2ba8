"""The AdamW state of an original MAE / SemMAE training checkpoint, in the Flax layout.

MAE's `misc.save_model` stores `optimizer.state_dict()`, whose state is keyed by
parameter *index*, not name. The indices run over the parameter groups the original
built, in order, each group's parameters in `model.named_parameters()` order (which is
the state dict's key order: these models have no buffers):

* pretraining (`main_pretrain.py`: timm 0.3.2's `add_weight_decay(model, wd)`): group 0
  every trainable parameter that is 1-d or a `.bias` (no decay), group 1 all the others;
  the fixed sin-cos tables (`requires_grad=False`) are not in the optimizer.
* fine-tuning (`main_finetune.py`: `lr_decay.param_groups_lrd`): one group per (layer id,
  decay or not), in the order they are first met; layer id 0 for cls_token, pos_embed
  and patch_embed, i + 1 for block i, depth + 1 for the rest; no decay for 1-d
  parameters, pos_embed and cls_token.

`original_parameter_groups` rebuilds those lists of names. Group sizes and every
moment's shape are checked against them, and a file that does not fit (another
optimizer, other groups) is refused with the reason rather than imported wrongly.

The moments are mapped to Flax by the same key table as the weights: transposes and
reshapes, which commute with Adam's element-wise arithmetic.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convert.core import POSITION_TABLES, torch_to_flax
from convert.safe_load import load_training_checkpoint, tensor_to_numpy
from convert.table import ConversionError, flax_path
from semmae_jax.models import layer_id


@dataclasses.dataclass(frozen=True)
class TorchAdamState:
    """AdamW's moments in the Flax params' layout (the fixed tables hold zeros), and where the run was.

    `steps` is torch's per-parameter step (Adam's bias correction); `epoch` the last
    finished epoch, so the run continues at `epoch + 1` as the original's `--resume` does.
    """

    mu: dict[str, Any]
    nu: dict[str, Any]
    steps: int
    epoch: int
    betas: tuple[float, float]


def original_parameter_groups(state_dict: Mapping[str, np.ndarray]) -> list[list[str]]:
    """The names in each of the original optimizer's parameter groups, in its index order."""
    if any(key.startswith(("decoder_", "mask_token")) for key in state_dict):
        return _pretraining_groups(state_dict)
    if "head.weight" in state_dict:
        return _finetuning_groups(state_dict)
    raise ConversionError("an optimizer state beside weights that are neither an MAE nor a classifier")


def _pretraining_groups(state_dict: Mapping[str, np.ndarray]) -> list[list[str]]:
    trainable = [key for key in state_dict if key not in POSITION_TABLES]
    no_decay = [key for key in trainable if np.ndim(state_dict[key]) == 1 or key.endswith(".bias")]
    exempt = set(no_decay)
    return [no_decay, [key for key in trainable if key not in exempt]]


def _finetuning_groups(state_dict: Mapping[str, np.ndarray]) -> list[list[str]]:
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    groups: dict[tuple[int, bool], list[str]] = {}
    for key, value in state_dict.items():
        decay = np.ndim(value) > 1 and key not in ("pos_embed", "cls_token")
        groups.setdefault((layer_id(flax_path(key)[0], depth), decay), []).append(key)
    return list(groups.values())


def torch_adam_state(path: str | Path, model_name: str | None = None) -> TorchAdamState | None:
    """The AdamW state of a MAE / SemMAE training `.pth`, or None when it holds no optimizer.

    Raises `ConversionError` (naming the file) when the optimizer does not fit the
    original's pretraining or fine-tuning groups of the weights beside it.
    """
    state_dict, info, optimizer = load_training_checkpoint(path)
    if optimizer is None:
        return None
    if info.epoch is None:
        raise ConversionError(f"{path}: has an 'optimizer' but no 'epoch': cannot tell where the run was")
    try:
        moments, steps, betas = _moments_by_name(state_dict, optimizer)
    except ConversionError as err:
        raise ConversionError(f"{path}: optimizer: {err}; to start from the weights alone, convert the file with "
                              "`python main.py convert to-flax` and resume from that") from err
    flax_moments = {}
    for name in ("exp_avg", "exp_avg_sq"):
        full = OrderedDict((key, moments[key][name] if key in moments else np.zeros_like(value))
                           for key, value in state_dict.items())
        flax_moments[name], _, _ = torch_to_flax(full, model_name, hint=info.args_model)
    return TorchAdamState(flax_moments["exp_avg"], flax_moments["exp_avg_sq"], steps, info.epoch, betas)


def _moments_by_name(
    state_dict: Mapping[str, np.ndarray], optimizer: Mapping[str, Any]
) -> tuple[dict[str, dict[str, np.ndarray]], int, tuple[float, float]]:
    """{name: {'exp_avg', 'exp_avg_sq'}}, the step count and the betas of a torch AdamW state dict."""
    groups, state = optimizer.get("param_groups"), optimizer.get("state")
    if not isinstance(groups, list) or not isinstance(state, Mapping):
        raise ConversionError("not a torch optimizer state dict (no 'param_groups' / 'state')")
    names = original_parameter_groups(state_dict)
    sizes, expected = [len(group.get("params", ())) for group in groups], [len(group) for group in names]
    if sizes != expected:
        raise ConversionError(f"parameter groups of sizes {sizes}, but the original's groups of these weights "
                              f"have sizes {expected}")
    moments, steps = {}, set()
    ordered = [name for group in names for name in group]
    for name, index in zip(ordered, (i for group in groups for i in group["params"]), strict=True):
        entry = state.get(index)
        if not isinstance(entry, Mapping) or not {"exp_avg", "exp_avg_sq", "step"} <= set(entry):
            raise ConversionError(f"no AdamW state (exp_avg, exp_avg_sq, step) for parameter {index} ({name})")
        arrays = {key: tensor_to_numpy(entry[key]) for key in ("exp_avg", "exp_avg_sq")}
        for key, array in arrays.items():
            if array.shape != state_dict[name].shape:
                raise ConversionError(f"{key} of parameter {index} has shape {array.shape}, but {name} is "
                                      f"{state_dict[name].shape}")
        moments[name] = arrays
        steps.add(int(float(entry["step"])))
    if len(steps) != 1:
        raise ConversionError(f"parameters were stepped different numbers of times: {sorted(steps)}")
    betas = tuple(float(b) for b in groups[0].get("betas", (0.9, 0.999)))
    return moments, steps.pop(), betas
