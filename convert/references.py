"""The PyTorch reference models that the JAX models are checked against.

- Classifiers and encoders: timm's `VisionTransformer`, whose state dict has exactly the
  original's keys, built with MAE's LayerNorm eps (1e-6; timm's default is 1e-5) and
  exact GELU, `global_pool='avg'` + `fc_norm` or `'token'` + `norm` as the checkpoint.
- MAE pretraining: transformers' `ViTMAEForPreTraining` (an independent implementation
  with a `noise` argument), eps 1e-6, `hidden_act='gelu'` (exact); `ViTMAEModel` for the
  encoder alone. Its keys differ from the `.pth` layout (q, k, v apart, other names):
  `pth_to_hf` / `hf_to_pth` map them with one template table read both ways.

Import this module before anything imports TensorFlow: timm and transformers load triton,
which crashes the process when it is loaded after TensorFlow.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import timm.models.vision_transformer as timm_vit
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from convert.safe_load import numpy_to_tensor

LN_EPS = 1e-6

# (.pth template, transformers template): {e} is the encoder's prefix ('vit.' inside
# ViTMAEForPreTraining, '' in ViTMAEModel), {i} a block index, {w} 'weight' or 'bias'.
_BLOCK_NAMES = (("blocks", "{e}layers"), ("decoder_blocks", "decoder.decoder_layers"))
_IN_BLOCK = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.o_proj"),
             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))  # fmt: skip
_LAYOUT: tuple[tuple[str, str], ...] = (
    ("cls_token", "{e}embeddings.cls_token"),
    ("pos_embed", "{e}embeddings.position_embeddings"),
    ("patch_embed.proj.{w}", "{e}embeddings.patch_embeddings.projection.{w}"),
    ("norm.{w}", "{e}layernorm.{w}"),
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.decoder_pos_embed"),
    ("decoder_embed.{w}", "decoder.decoder_embed.{w}"),
    ("decoder_norm.{w}", "decoder.decoder_norm.{w}"),
    ("decoder_pred.{w}", "decoder.decoder_pred.{w}"),
    *((f"{b}.{{i}}.{p}.{{w}}", f"{h}.{{i}}.{q}.{{w}}") for b, h in _BLOCK_NAMES for p, q in _IN_BLOCK),
    # The fused qkv: split into q, k, v one way, concatenated the other.
    *((f"{b}.{{i}}.attn.qkv.{{w}}", f"{h}.{{i}}.attention.{{qkv}}_proj.{{w}}") for b, h in _BLOCK_NAMES),
)
_FIELDS = {"i": r"(?P<i>\d+)", "w": r"(?P<w>weight|bias)", "qkv": r"(?P<qkv>[qkv])"}


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
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=LN_EPS),
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
        layer_norm_eps=LN_EPS,
        qkv_bias=True,
        mask_ratio=mask_ratio,
        norm_pix_loss=config.get("norm_pix_loss", False),
    )
    return (ViTMAEModel if encoder_only else ViTMAEForPreTraining)(hf_config).eval()


def pth_to_hf(state_dict: Mapping[str, np.ndarray], encoder_prefix: str = "vit.") -> OrderedDict[str, np.ndarray]:
    """`.pth` keys -> transformers keys (q, k, v split from the fused qkv)."""
    out = OrderedDict()
    for key, value in state_dict.items():
        fields, hf = _match(key, 0, encoder_prefix)
        if "{qkv}" in hf:
            for name, part in zip("qkv", np.split(value, 3), strict=True):
                out[hf.format(qkv=name, **fields)] = part
        else:
            out[hf.format(**fields)] = value
    return out


def hf_to_pth(state_dict: Mapping[str, np.ndarray], encoder_prefix: str = "vit.") -> OrderedDict[str, np.ndarray]:
    """transformers keys -> `.pth` keys (q, k, v concatenated into qkv)."""
    out = OrderedDict()
    for key, value in state_dict.items():
        fields, pth = _match(key, 1, encoder_prefix)
        if fields.get("qkv") == "q":
            parts = [state_dict[key.replace(".q_proj.", f".{name}_proj.")] for name in "qkv"]
            out[pth.format(**fields)] = np.concatenate(parts)
        elif "qkv" not in fields:
            out[pth.format(**fields)] = value
    return out


def _match(key: str, side: int, encoder_prefix: str) -> tuple[dict[str, str], str]:
    """(placeholder values, the other side's template) for `key` on `side` (0 pth, 1 hf)."""
    for pair in _LAYOUT:
        template = pair[side].replace("{e}", encoder_prefix)
        pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**_FIELDS)
        match = re.fullmatch(pattern, key)
        if match:
            return match.groupdict(), pair[1 - side].replace("{e}", encoder_prefix)
    raise KeyError(f"no .pth <-> transformers mapping for {key!r}")


def load_numpy_state_dict(module: torch.nn.Module, state_dict: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """`module.load_state_dict(strict=True)` from numpy arrays (dtypes kept)."""
    module.load_state_dict({k: numpy_to_tensor(v) for k, v in state_dict.items()}, strict=True)
    return module


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with non-trivial norms everywhere, for parity checks.

    Freshly initialised models hide errors: zero biases, unit LayerNorm scales and a head
    at std 2e-5 make wrong paths invisible. Here Linear / conv weights are N(0, 1 / fan_in)
    (activations keep their scale through depth), biases N(0, 0.2^2), LayerNorm scales
    1 + N(0, 0.2^2), tokens and position tables N(0, 0.5^2).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal_(param: torch.Tensor, std: float, mean: float = 0.0) -> None:
        param.normal_(mean, std, generator=gen)

    done = set()
    for sub in module.modules():
        if isinstance(sub, torch.nn.LayerNorm):
            normal_(sub.weight, 0.2, mean=1.0)
        elif isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            normal_(sub.weight, sub.weight[0].numel() ** -0.5)
        else:
            continue
        normal_(sub.bias, 0.2)
        done |= {id(sub.weight), id(sub.bias)}
    for param in module.parameters():
        if id(param) not in done:
            normal_(param, 0.5)
    return module
