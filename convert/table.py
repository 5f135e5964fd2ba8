"""The key table between PyTorch MAE/SemMAE state dicts and Flax params.

One declarative table drives both directions, so they cannot drift:

| torch key (regex)                                   | flax path                         | transform            |
|-----------------------------------------------------|-----------------------------------|----------------------|
| cls_token, pos_embed, mask_token, decoder_pos_embed | same name                         | none                 |
| patch_embed.proj.weight  [D, C, p, p]               | patch_embed/proj/kernel [p,p,C,D] | OIHW -> HWIO         |
| {blocks,decoder_blocks}.i.norm{1,2}.weight          | {..}_i/norm{1,2}/scale            | none                 |
| {..}.i.attn.qkv.weight   [3D, D]                    | {..}_i/attn/qkv/kernel [D,3,H,hd] | transpose, reshape   |
| {..}.i.attn.qkv.bias     [3D]                       | {..}_i/attn/qkv/bias   [3,H,hd]   | reshape              |
| {..}.i.attn.proj.weight  [D, D]                     | {..}_i/attn/proj/kernel [H,hd,D]  | transpose, reshape   |
| any other Linear .weight [out, in] (head, pooler)   | .../kernel [in, out]              | transpose            |
| LayerNorm .weight / .bias                           | .../scale / .../bias              | none                 |

Every transform is a transpose and/or reshape, so a round trip gives back every tensor
bit for bit, whatever its dtype (bfloat16 included). Transforms use only array methods
(`.T`, `.transpose`, `.reshape`), so the same rule maps a numpy array and, under
`jax.eval_shape`, a bare shape; callers make the results contiguous.

Canonical torch key order (`canonical_order`) is the order of the original code's
`state_dict()`: a module's own parameters first, in registration order, then its
submodules in registration order; inside a block norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2, each weight before bias:

- MAE pretraining (`models_mae.py`): cls_token, pos_embed, mask_token, decoder_pos_embed,
  patch_embed.*, blocks.*, norm.*, decoder_embed.*, decoder_blocks.*, decoder_norm.*,
  decoder_pred.*
- fine-tuned, global pool (`models_vit.py`, timm 0.3.2 + `fc_norm` added after
  `del self.norm`): cls_token, pos_embed, patch_embed.*, blocks.*, head.*, fc_norm.*
- fine-tuned, cls token: cls_token, pos_embed, patch_embed.*, blocks.*, norm.*, head.*
- encoder only (released MAE encoders, DINO, iBOT): cls_token, pos_embed, patch_embed.*,
  blocks.*, norm.*; transformers' `ViTModel` adds its pooler as `pooler.*` (a Linear; no
  original or timm model has one)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Array = Any  # a numpy array, or a tracer under `jax.eval_shape`
Shape = tuple[int, ...]

_BLOCKS = r"(blocks|decoder_blocks)\.(\d+)\."


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: unreadable, refused, or not the model's."""


@dataclass(frozen=True)
class Rule:
    """How one family of torch keys maps to Flax paths."""

    torch: str  # regex over the torch key
    flax: str  # replacement template for the '/'-joined Flax path
    to_flax: Callable[[Array, int], Array]  # (torch tensor, num_heads) -> flax array
    to_torch: Callable[[Array], Array]  # flax array -> torch tensor


def _same(x: Array, heads: int = 0) -> Array:
    return x


def _linear_t(x: Array, heads: int = 0) -> Array:
    return x.T


def _qkv_kernel(x: Array, heads: int) -> Array:
    three_d, dim = x.shape
    return x.T.reshape(dim, 3, heads, three_d // 3 // heads)


def _qkv_bias(x: Array, heads: int) -> Array:
    return x.reshape(3, heads, x.shape[0] // 3 // heads)


def _proj_kernel(x: Array, heads: int) -> Array:
    out, dim = x.shape
    return x.T.reshape(heads, dim // heads, out)


RULES: tuple[Rule, ...] = (
    Rule(r"^(cls_token|pos_embed|mask_token|decoder_pos_embed)$", r"\1", _same, _same),
    Rule(
        r"^patch_embed\.proj\.weight$",
        "patch_embed/proj/kernel",
        lambda x, h: x.transpose(2, 3, 1, 0),
        lambda x: x.transpose(3, 2, 0, 1),
    ),
    Rule(r"^patch_embed\.proj\.bias$", "patch_embed/proj/bias", _same, _same),
    Rule(_BLOCKS + r"attn\.qkv\.weight$", r"\1_\2/attn/qkv/kernel", _qkv_kernel, lambda x: x.reshape(x.shape[0], -1).T),
    Rule(_BLOCKS + r"attn\.qkv\.bias$", r"\1_\2/attn/qkv/bias", _qkv_bias, lambda x: x.reshape(-1)),
    Rule(
        _BLOCKS + r"attn\.proj\.weight$",
        r"\1_\2/attn/proj/kernel",
        _proj_kernel,
        lambda x: x.reshape(-1, x.shape[-1]).T,
    ),
    Rule(_BLOCKS + r"(attn\.proj|mlp\.fc1|mlp\.fc2)\.bias$", r"\1_\2/\3/bias", _same, _same),
    Rule(_BLOCKS + r"(mlp\.fc1|mlp\.fc2)\.weight$", r"\1_\2/\3/kernel", _linear_t, _linear_t),
    Rule(_BLOCKS + r"(norm1|norm2)\.weight$", r"\1_\2/\3/scale", _same, _same),
    Rule(_BLOCKS + r"(norm1|norm2)\.bias$", r"\1_\2/\3/bias", _same, _same),
    Rule(r"^(norm|fc_norm|decoder_norm)\.weight$", r"\1/scale", _same, _same),
    Rule(r"^(norm|fc_norm|decoder_norm)\.bias$", r"\1/bias", _same, _same),
    Rule(r"^(decoder_embed|decoder_pred|head|pooler)\.weight$", r"\1/kernel", _linear_t, _linear_t),
    Rule(r"^(decoder_embed|decoder_pred|head|pooler)\.bias$", r"\1/bias", _same, _same),
)

# Position of each top-level torch name in the original's `state_dict()` (see the module
# docstring); the two classifier layouts never hold both `norm` and `fc_norm`, so one
# sequence orders them both.
_TOP_ORDER = {
    "mae": ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed", "blocks", "norm",
            "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred"),
    "vit": ("cls_token", "pos_embed", "patch_embed", "blocks", "norm", "head", "fc_norm", "pooler"),
}  # fmt: skip
_BLOCK_ORDER = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_LEAF_ORDER = ("weight", "bias")


def flax_path(torch_key: str) -> tuple[str, Rule]:
    """The Flax path ('a/b/c') and rule for a torch key; KeyError if no rule knows it."""
    for rule in RULES:
        path, n = re.subn(rule.torch, rule.flax, torch_key)
        if n:
            return path.replace(".", "/"), rule
    raise KeyError(torch_key)


def torch_key(path: str) -> str:
    """The torch key for a Flax path: the inverse of `flax_path`; KeyError if none."""
    parts = path.split("/")
    if len(parts) == 1:
        key = path
    else:
        head, leaf = parts[:-1], parts[-1]
        if re.fullmatch(r"(blocks|decoder_blocks)_\d+", head[0]):
            prefix, index = head[0].rsplit("_", 1)
            head = [prefix, index, *head[1:]]
        suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf, leaf)
        key = ".".join([*head, suffix])
    if flax_path(key)[0] != path:
        raise KeyError(path)
    return key


def heads_for(key: str, num_heads: int, decoder_num_heads: int) -> int:
    """The head count that splits `key`'s attention weights: the decoder has its own."""
    return decoder_num_heads if key.startswith("decoder_blocks.") else num_heads


def to_flax_array(key: str, value: Array, num_heads: int) -> tuple[str, Array]:
    """(flax path, array) for one torch tensor; `num_heads` of the block it belongs to."""
    path, rule = flax_path(key)
    return path, rule.to_flax(value, num_heads)


def torch_key_and_shape(path: str, shape: Shape) -> tuple[str, Shape]:
    """The torch key and shape of a Flax param of `shape`, traced (`jax.eval_shape`), no data."""
    key = torch_key(path)
    _, rule = flax_path(key)
    return key, tuple(jax.eval_shape(rule.to_torch, jax.ShapeDtypeStruct(shape, jnp.float32)).shape)


def to_torch_array(path: str, value: Array) -> tuple[str, Array]:
    """(torch key, tensor) for one Flax array: the inverse of `to_flax_array`."""
    key = torch_key(path)
    _, rule = flax_path(key)
    return key, rule.to_torch(value)


def canonical_order(keys: Iterable[str], family: str) -> list[str]:
    """`keys` sorted as the original's `state_dict()` of `family` ('mae' or 'vit') lists them."""
    top = _TOP_ORDER[family]

    def rank(key: str) -> tuple:
        name, _, rest = key.partition(".")
        if name in ("blocks", "decoder_blocks"):
            index, _, rest = rest.partition(".")
            module, _, leaf = rest.rpartition(".")
            return top.index(name), int(index), _BLOCK_ORDER.index(module), _LEAF_ORDER.index(leaf)
        leaf = key.rpartition(".")[2] if rest else ""
        return top.index(name), 0, 0, _LEAF_ORDER.index(leaf) if leaf else 0

    return sorted(keys, key=rank)


def unflatten(flat: Mapping[str, Array]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Array]:
    """{'a': {'b': {'c': x}}} -> {'a/b/c': x}."""
    flat: dict[str, Array] = {}
    for name, value in tree.items():
        path = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat
