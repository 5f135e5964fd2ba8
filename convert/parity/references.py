"""The PyTorch reference models that the JAX models are checked against.

- Classifiers and encoders: timm's `VisionTransformer`, whose state dict has exactly the
  original's keys, built with MAE's LayerNorm eps (1e-6; timm's default is 1e-5) and
  exact GELU, `global_pool='avg'` + `fc_norm` or `'token'` + `norm` as the checkpoint.
- MAE pretraining: transformers' `ViTMAEForPreTraining` (an independent implementation
  with a `noise` argument), eps 1e-6, `hidden_act='gelu'` (exact); `ViTMAEModel` for the
  encoder alone. Weights reach it through a `save_pretrained` directory (`hf_pretrained`):
  the converter writes and reads transformers' on-disk layout (`convert.hf_keys`), and
  transformers maps that onto its modules itself.
- A transformers checkpoint (`parity --checkpoint HF_DIR`): its own class, `hf_pretrained`.

Import this module before anything imports TensorFlow: timm and transformers load triton,
which crashes the process when it is loaded after TensorFlow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm.models.vision_transformer as timm_vit
import torch
import transformers
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from convert.arch import Architecture
from convert.core import flax_to_torch
from convert.hf_files import write_hf
from convert.safe_load import numpy_to_tensor
from convert.table import ConversionError

LN_EPS = 1e-6

def timm_classifier(config: Mapping[str, Any]) -> timm_vit.VisionTransformer:
    """A timm ViT with the JAX model's shape and pooling; weights left for the caller to load."""
    return timm_vit.VisionTransformer(
        img_size=config["img_size"],
        patch_size=config["patch_size"],
        in_chans=config["in_chans"],
        num_classes=config["num_classes"],
        global_pool="avg" if config["global_pool"] else "token",
        fc_norm=config["global_pool"],
        embed_dim=config["embed_dim"],
        depth=config["depth"],
        num_heads=config["num_heads"],
        mlp_ratio=config["mlp_ratio"],
        qkv_bias=config.get("qkv_bias", True),
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=config.get("layer_norm_eps", LN_EPS)),
        act_layer=torch.nn.GELU,
        weight_init="skip",
    ).eval()


def hf_mae(config: Mapping[str, Any], *, encoder_only: bool = False, mask_ratio: float = 0.75) -> torch.nn.Module:
    """transformers' `ViTMAEForPreTraining` (or `ViTMAEModel`) with the JAX model's shape."""
    decoder_width, ratio = config.get("decoder_embed_dim", 512), config["mlp_ratio"]
    hf_config = ViTMAEConfig(
        image_size=config["img_size"],
        patch_size=config["patch_size"],
        num_channels=config["in_chans"],
        hidden_size=config["embed_dim"],
        num_hidden_layers=config["depth"],
        num_attention_heads=config["num_heads"],
        intermediate_size=int(config["embed_dim"] * ratio),
        decoder_hidden_size=decoder_width,
        decoder_num_hidden_layers=config.get("decoder_depth", 8),
        decoder_num_attention_heads=config.get("decoder_num_heads", 16),
        decoder_intermediate_size=int(decoder_width * ratio),
        hidden_act="gelu",
        layer_norm_eps=config.get("layer_norm_eps", LN_EPS),
        qkv_bias=config.get("qkv_bias", True),
        mask_ratio=mask_ratio,
        norm_pix_loss=config.get("norm_pix_loss", False),
    )
    return (ViTMAEModel if encoder_only else ViTMAEForPreTraining)(hf_config).eval()


def hf_pretrained(directory: str | Path, hf_class: str) -> torch.nn.Module:
    """transformers' own `hf_class` (`ViTMAEForPreTraining`, ...) from a `save_pretrained` directory,
    refused unless every tensor fits (no missing, unexpected or mismatched keys)."""
    model, info = getattr(transformers, hf_class).from_pretrained(directory, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ConversionError(f"{directory}: transformers' {hf_class} does not load it cleanly: {problems or info}")
    return model.eval()


def classifier_forward(module: torch.nn.Module, hf_class: str | None) -> Callable[[torch.Tensor], np.ndarray]:
    """NCHW images -> what the JAX classifier returns: logits, or the cls features after the
    final norm for an encoder, `pooler_output` for a ViTModel with its pooler (`hf_class`
    None: a timm model, which returns either itself)."""
    if hf_class is None:
        return lambda x: module(x).numpy()
    if hf_class == "ViTForImageClassification":
        return lambda x: module(pixel_values=x).logits.numpy()
    if hf_class == "ViTMAEModel":  # it masks: keep every patch, in order (increasing noise)
        module.config.mask_ratio = 0.0
        return lambda x: module(pixel_values=x, noise=_in_order(x, module.config.patch_size)).last_hidden_state[:, 0].numpy()
    if getattr(module, "pooler", None) is not None:
        return lambda x: module(pixel_values=x).pooler_output.numpy()
    return lambda x: module(pixel_values=x).last_hidden_state[:, 0].numpy()


def _in_order(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    num_patches = (images.shape[-1] // patch_size) ** 2
    return torch.arange(num_patches, dtype=torch.float32).expand(len(images), -1)


def load_numpy_state_dict(module: torch.nn.Module, state_dict: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """`module.load_state_dict(strict=True)` from numpy arrays (dtypes kept)."""
    module.load_state_dict({k: numpy_to_tensor(v) for k, v in state_dict.items()}, strict=True)
    return module


def reference_from_params(
    params: Any, arch: Architecture, scratch: str, meta: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, str | None]:
    """The PyTorch reference holding `params` (Flax) of `arch`, bit for bit: timm for classifiers and
    encoders, transformers (through a `to-hf` directory in `scratch`) for MAE and pooler encoders."""
    state_dict = flax_to_torch(params, arch.name, model_overrides=arch.overrides)
    if arch.family == "mae" or arch.config["pooler"]:
        hf_class = write_hf(scratch, state_dict, arch, meta or {})
        return hf_pretrained(scratch, hf_class), hf_class
    return load_numpy_state_dict(timm_classifier(arch.config), state_dict), None
