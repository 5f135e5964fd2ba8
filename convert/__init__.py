"""PyTorch <-> Flax checkpoint conversion for MAE / SemMAE models.

    state_dict, info = load_torch_checkpoint("mae_pretrain_vit_base.pth")  # no pickle code runs
    params, name, overrides = torch_to_flax(state_dict)                     # architecture inferred
    state_dict_again = flax_to_torch(params, name)                          # bit for bit, same order
    params, name, overrides = params_from_checkpoint("x.pth" or "orbax_dir" or "hf_dir")
    params, name, overrides, meta = read_checkpoint("hf_dir")              # + mask_ratio, id2label, ...

The command line (`python -m convert` / `python main.py convert`) is in `convert.cli`,
the comparison against timm / transformers (`python main.py parity`) in `convert.parity`.
"""

from convert.arch import Architecture, infer_architecture, key_mismatches
from convert.core import Loaded, flax_to_torch, params_from_checkpoint, read_checkpoint, torch_to_flax
from convert.safe_load import CheckpointInfo, load_torch_checkpoint, save_torch_checkpoint
from convert.table import ConversionError

__all__ = [
    "Architecture",
    "CheckpointInfo",
    "ConversionError",
    "Loaded",
    "flax_to_torch",
    "infer_architecture",
    "key_mismatches",
    "load_torch_checkpoint",
    "params_from_checkpoint",
    "read_checkpoint",
    "save_torch_checkpoint",
    "torch_to_flax",
]
