"""transformers checkpoints on disk: `save_pretrained` directories and lone `.safetensors` files.

Read (`read_hf`):

- a directory with `config.json` and its weights: `model.safetensors`, a sharded
  `model.safetensors.index.json`, or `pytorch_model.bin` (through the safe loader: no
  pickled code runs; safetensors holds no code at all);
- a lone `.safetensors` file: transformers' layout (the class read from the keys, the
  architecture from the shapes, `layer_norm_eps` transformers' default 1e-12) or the
  original / timm layout (`to-torch --format safetensors` writes it).

`config.json` decides what the shapes cannot show: the head counts, `layer_norm_eps`
(the hub's MAE configs carry 1e-12, not MAE's 1e-6) and `norm_pix_loss` become model
overrides; `hidden_act` other than exact GELU is refused (the JAX models implement no
other); `mask_ratio` and `id2label` go to the checkpoint's meta; `image_size`,
`patch_size`, widths, depths, `qkv_bias` and `num_labels` are checked against the
tensors (which decide `qkv_bias` and ViTModel's pooler).

Write (`write_hf`): `config.json` + `model.safetensors` in the hub's layout, so that
`from_pretrained` of any transformers version loads it with no missing, unexpected or
mismatched keys. A config read earlier (kept in the meta) is written back with the
model's fields updated, so a directory -> Flax -> directory round trip returns it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from convert.arch import Architecture, read_layout
from convert.hf_keys import ENCODER_PREFIX, MODEL_TYPE, class_from_keys, hub_to_pth, is_hub_layout, pth_to_hub
from convert.safe_load import load_torch_checkpoint
from convert.table import ConversionError
from semmae_jax.image_size import ImageSize, image_size, size_text

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TRANSFORMERS_EPS = 1e-12  # ViTConfig's and ViTMAEConfig's default layer_norm_eps
# Activations the JAX models compute: exact (erf) GELU only.
SUPPORTED_ACT = ("gelu",)
# config.json field -> the field read from the shapes (`arch.read_layout`) it must equal.
_CHECKED = {"image_size": "img_size", "patch_size": "patch_size", "num_channels": "in_chans",
            "hidden_size": "embed_dim", "num_hidden_layers": "depth", "decoder_hidden_size": "decoder_embed_dim",
            "decoder_num_hidden_layers": "decoder_depth", "num_labels": "num_classes", "qkv_bias": "qkv_bias"}  # fmt: skip


@dataclass(frozen=True)
class HFCheckpoint:
    """A transformers checkpoint read into the `.pth` layout, with what its config decides."""

    state_dict: OrderedDict[str, np.ndarray]
    hf_class: str | None  # None: a lone safetensors file in the original / timm layout
    config: dict[str, Any] = field(default_factory=dict)  # config.json ({} for a lone file)
    files: tuple[str, ...] = ()
    renamed: bool = False  # transformers 5's decoder block names

    @property
    def stated(self) -> dict[str, Any]:
        """`create_model` overrides the config states: heads, LayerNorm eps, norm_pix_loss, and the
        image size (the position table's grid, which the shapes cannot split into rows and columns)."""
        if self.hf_class is None:
            return {}
        stated = {"layer_norm_eps": float(self.config.get("layer_norm_eps", TRANSFORMERS_EPS))}
        if not isinstance(image_size(self.config.get("image_size", 1)), int):  # a square table tells its own
            stated["img_size"] = image_size(self.config["image_size"])
        if "num_attention_heads" in self.config:
            stated["num_heads"] = int(self.config["num_attention_heads"])
        if self.hf_class == "ViTMAEForPreTraining":
            stated["norm_pix_loss"] = bool(self.config.get("norm_pix_loss", False))
            if "decoder_num_attention_heads" in self.config:
                stated["decoder_num_heads"] = int(self.config["decoder_num_attention_heads"])
        return stated

    @property
    def meta(self) -> dict[str, Any]:
        """What the checkpoint's meta keeps: the class, the config, `mask_ratio`, `id2label`."""
        if self.hf_class is None:
            return {}
        meta: dict[str, Any] = {"transformers": {"class": self.hf_class, "config": self.config}}
        if self.hf_class == "ViTMAEForPreTraining":
            meta["mask_ratio"] = float(self.config.get("mask_ratio", 0.75))
        if self.hf_class == "ViTForImageClassification" and "id2label" in self.config:
            meta["id2label"] = {str(k): v for k, v in self.config["id2label"].items()}
        return meta

    def summary(self) -> str:
        """The detected layout, one line: 'transformers ViTMAEForPreTraining, eps 1e-12, ...'."""
        if self.hf_class is None:
            return f"read {', '.join(self.files)}: original / timm layout (safetensors)"
        facts = [f"eps {self.stated['layer_norm_eps']:g}" + ("" if self.config else " (transformers' default)")]
        facts += [f"{k} {self.config[k]}" for k in ("hidden_act", "qkv_bias", "image_size", "patch_size") if k in self.config]
        if "pooler.bias" in self.state_dict:
            facts.append("with its tanh pooler")
        facts += [f"{k} {v}" for k, v in self.meta.items() if k == "mask_ratio"]
        if "norm_pix_loss" in self.stated:
            facts.append(f"norm_pix_loss {self.stated['norm_pix_loss']}")
        if self.hf_class == "ViTForImageClassification":
            facts.append(f"{len(self.state_dict['head.bias'])} labels" + (" (id2label kept)" if "id2label" in self.meta else ""))
        if self.renamed:
            facts.append("transformers 5 decoder names")
        return f"transformers {self.hf_class}, " + ", ".join(facts) + f" (read {', '.join(self.files)})"


def is_hf_source(path: str | Path) -> bool:
    """A `save_pretrained` directory (`config.json` beside a weights file) or a `.safetensors` file."""
    path = Path(path)
    if path.is_dir():
        return (path / CONFIG).is_file() and any((path / name).is_file() for name in WEIGHTS)
    return path.suffix == ".safetensors"


def read_hf(path: str | Path, trust_pickle: bool = False) -> HFCheckpoint:
    """The checkpoint at `path` (see the module docstring); errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        config = read_config(path / CONFIG)
        tensors, files = _directory_tensors(path, trust_pickle)
    else:
        config, (tensors, files) = {}, (read_safetensors(path), (str(path),))
    if not is_hub_layout(tensors):
        if config:
            raise ConversionError(f"{path}: the weights are not in transformers' layout (first keys {list(tensors)[:3]})")
        return HFCheckpoint(OrderedDict(tensors), None, files=files)
    hf_class = _class_of(path, config, tensors)
    hf = HFCheckpoint(hub_to_pth(tensors, hf_class), hf_class, config, files,
                      renamed=any(".decoder_encoder." in key for key in tensors))  # fmt: skip
    _check_config(path, hf)
    return hf


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; refused when it is not a ViT / ViT-MAE or asks for what the models lack."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: not a readable JSON config: {err}") from err
    if not isinstance(config, dict) or config.get("model_type") not in MODEL_TYPE.values():
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise ConversionError(f"{path}: model_type {model_type!r} is not a ViT or ViT-MAE ('vit', 'vit_mae')")
    act = config.get("hidden_act", "gelu")
    if act not in SUPPORTED_ACT:
        raise ConversionError(
            f"{path}: hidden_act {act!r} is not implemented by the JAX models (they compute exact GELU, "
            f"hidden_act {SUPPORTED_ACT[0]!r})"
        )
    return config


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy (bfloat16 as `ml_dtypes.bfloat16`), in file order."""
    try:
        return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ConversionError(f"{path}: not a readable safetensors file: {err}") from err


def _directory_tensors(directory: Path, trust_pickle: bool) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The tensors of a `save_pretrained` directory, from the first weights file it has."""
    found = next((directory / name for name in WEIGHTS if (directory / name).is_file()), None)
    if found is None:
        raise ConversionError(f"{directory}: has {CONFIG} but no weights (looked for {', '.join(WEIGHTS)})")
    if found.name.endswith(".index.json"):
        return _sharded_tensors(found, trust_pickle)
    return _tensor_file(found, trust_pickle), (str(found),)


def _sharded_tensors(index: Path, trust_pickle: bool) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConversionError(f"{index}: not a readable shard index (no 'weight_map'): {err}") from err
    tensors: dict[str, np.ndarray] = {}
    shards = tuple(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if not (index.parent / shard).is_file():
            raise ConversionError(f"{index}: shard {shard} is missing")
        tensors.update(_tensor_file(index.parent / shard, trust_pickle))
    absent = [key for key in weight_map if key not in tensors]
    if absent:
        raise ConversionError(f"{index}: {len(absent)} tensors listed but not in their shards (e.g. {absent[0]})")
    return tensors, tuple(str(index.parent / shard) for shard in shards)


def _tensor_file(path: Path, trust_pickle: bool) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return dict(load_torch_checkpoint(path, trust_pickle=trust_pickle)[0])


def _class_of(path: Path, config: Mapping[str, Any], tensors: Mapping[str, Any]) -> str:
    """The class config.json names (its first `architectures` entry), checked against the keys."""
    from_keys = class_from_keys(tensors)
    named = (config.get("architectures") or [None])[0]
    if named is None:
        return from_keys
    if named not in ENCODER_PREFIX:
        raise ConversionError(f"{path}: {named} is not supported (supported: {', '.join(ENCODER_PREFIX)})")
    same_keys = named == from_keys or (named, from_keys) == ("ViTModel", "ViTMAEModel")  # a ViTModel without pooler
    if not same_keys:
        raise ConversionError(f"{path}: config.json names {named}, but the weights are a {from_keys}'s")
    return named


def _check_config(path: Path, hf: HFCheckpoint) -> None:
    """Every config.json field the tensors also show must agree with them."""
    _, found = read_layout({key: tuple(value.shape) for key, value in hf.state_dict.items()}, hf.stated.get("img_size"))
    config = dict(hf.config)
    if "id2label" in config:
        config.setdefault("num_labels", len(config["id2label"]))
    if not found.get("num_classes"):
        config.pop("num_labels", None)  # transformers' default (2) in an encoder's config means nothing
    for name, ours in _CHECKED.items():
        if name in config and ours in found:
            stated = image_size(config[name]) if name == "image_size" else _square(config[name])
            if stated != found[ours]:
                raise ConversionError(f"{path}: config.json says {name} {stated}, the tensors hold {found[ours]}")


def _square(value: Any) -> Any:
    """transformers allows (h, w) pairs for patch sizes; the models take square patches."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"non-square size {value} is not supported")
        return value[0]
    return value


def hf_class_for(arch: Architecture, saved_class: str | None = None) -> str:
    """The transformers class that runs `arch` (an encoder read from a `ViTModel` stays one);
    a global-pool classifier has none."""
    config = arch.config
    if arch.family == "mae":
        return "ViTMAEForPreTraining"
    if config["global_pool"]:
        raise ConversionError(
            f"{arch} is a global-pool classifier (mean of the patch tokens -> fc_norm -> head), which "
            "transformers' ViTForImageClassification (final layernorm -> cls token -> classifier) cannot "
            "express; write the timm / original layout instead: to-torch (or to-torch --format safetensors)"
        )
    if config["num_classes"]:
        return "ViTForImageClassification"
    return "ViTModel" if config["pooler"] or saved_class == "ViTModel" else "ViTMAEModel"


def write_hf(
    directory: str | Path, state_dict: Mapping[str, np.ndarray], arch: Architecture, meta: Mapping[str, Any]
) -> str:
    """Write `config.json` + `model.safetensors` of `arch`'s transformers class; returns the class."""
    hf_class = hf_class_for(arch, meta.get("transformers", {}).get("class"))
    tensors = pth_to_hub(state_dict, hf_class)
    dtype = str(next(iter(tensors.values())).dtype)
    config = hf_config(arch, hf_class, meta, dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(dict(tensors), directory / WEIGHTS[0], metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return hf_class


def hf_config(arch: Architecture, hf_class: str, meta: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """transformers' config of `arch`: the saved one (if any, of the same model type) with the model's fields."""
    model = arch.config
    if hf_class == "ViTMAEForPreTraining" and not isinstance(model["img_size"], int):
        raise ConversionError(f"a {size_text(model['img_size'])} MAE cannot be written for transformers: its "
                              "ViTMAEForPreTraining builds the sin-cos position table square, from the number of "
                              "patches; write the MAE as .pth (to-torch), or its encoder (a ViT) to-hf")
    saved = dict(meta.get("transformers", {}).get("config", {}))
    config = saved if saved.get("model_type") == MODEL_TYPE[hf_class] else {}
    config.pop("transformers_version", None)
    config.update(
        architectures=[hf_class], model_type=MODEL_TYPE[hf_class], dtype=dtype,
        hidden_size=model["embed_dim"], num_hidden_layers=model["depth"], num_attention_heads=model["num_heads"],
        intermediate_size=round(model["embed_dim"] * model["mlp_ratio"]), hidden_act="gelu", qkv_bias=model["qkv_bias"],
        layer_norm_eps=model["layer_norm_eps"], image_size=_pair_or_side(model["img_size"]),
        patch_size=model["patch_size"],
        num_channels=model["in_chans"],
    )  # fmt: skip
    config.setdefault("hidden_dropout_prob", 0.0)
    config.setdefault("attention_probs_dropout_prob", 0.0)
    if hf_class == "ViTMAEForPreTraining":
        config.update(
            decoder_hidden_size=model["decoder_embed_dim"], decoder_num_hidden_layers=model["decoder_depth"],
            decoder_num_attention_heads=model["decoder_num_heads"],
            decoder_intermediate_size=round(model["decoder_embed_dim"] * model["mlp_ratio"]),
            norm_pix_loss=model["norm_pix_loss"], mask_ratio=float(meta.get("mask_ratio", 0.75)),
        )  # fmt: skip
    if hf_class == "ViTForImageClassification":
        _set_labels(config, meta.get("id2label"), model["num_classes"], written_before=bool(saved))
    return config


def _pair_or_side(size: ImageSize) -> int | list[int]:
    """config.json's `image_size`: one side when square, else [height, width]."""
    return size if isinstance(size, int) else list(size)


def _set_labels(config: dict[str, Any], id2label: Mapping[str, str] | None, num_classes: int, written_before: bool) -> None:
    """id2label: the saved names when there is one per class, else transformers' LABEL_i; label2id
    to match, except that a saved config's own label2id (transformers 5 writes null) is kept."""
    fresh = not id2label or len(id2label) != num_classes
    if fresh:
        id2label = {str(i): f"LABEL_{i}" for i in range(num_classes)}
    config["id2label"] = dict(id2label)
    if fresh or not written_before or config.get("label2id") is not None:
        config["label2id"] = {label: int(i) for i, label in id2label.items()}
