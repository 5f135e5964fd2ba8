"""The key table between PyTorch MAE/SemMAE state dicts and Flax params.

One declarative table drives both directions, so they cannot drift:

| torch key (regex)                               | flax path                        | transform            |
|-------------------------------------------------|----------------------------------|----------------------|
| cls_token, pos_embed, mask_token, decoder_pos_embed | same name                    | none                 |
| patch_embed.proj.weight  [D, C, p, p]           | patch_embed/proj/kernel [p,p,C,D]| OIHW -> HWIO         |
| {blocks,decoder_blocks}.i.norm{1,2}.weight      | {..}_i/norm{1,2}/scale           | none                 |
| {..}.i.attn.qkv.weight   [3D, D]                | {..}_i/attn/qkv/kernel [D,3,H,hd]| transpose, reshape   |
| {..}.i.attn.qkv.bias     [3D]                   | {..}_i/attn/qkv/bias   [3,H,hd]  | reshape              |
| {..}.i.attn.proj.weight  [D, D]                 | {..}_i/attn/proj/kernel [H,hd,D] | transpose, reshape   |
| any other Linear .weight [out, in]              | .../kernel [in, out]             | transpose            |
| LayerNorm .weight / .bias                       | .../scale / .../bias             | none                 |

Every transform is a transpose and/or reshape, so a round trip gives back every tensor
bit for bit, whatever its dtype (bfloat16 included). Arrays are numpy on the Flax side.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

Array = np.ndarray
Shape = tuple[int, ...]

_BLOCKS = r"(blocks|decoder_blocks)\.(\d+)\."


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
    return np.ascontiguousarray(x.T)


def _qkv_kernel(x: Array, heads: int) -> Array:
    three_d, dim = x.shape
    return np.ascontiguousarray(x.T).reshape(dim, 3, heads, three_d // 3 // heads)


def _qkv_bias(x: Array, heads: int) -> Array:
    return x.reshape(3, heads, x.shape[0] // 3 // heads)


def _proj_kernel(x: Array, heads: int) -> Array:
    out, dim = x.shape
    return np.ascontiguousarray(x.T).reshape(heads, dim // heads, out)


RULES: tuple[Rule, ...] = (
    Rule(r"^(cls_token|pos_embed|mask_token|decoder_pos_embed)$", r"\1", _same, _same),
    Rule(
        r"^patch_embed\.proj\.weight$",
        "patch_embed/proj/kernel",
        lambda x, h: np.ascontiguousarray(x.transpose(2, 3, 1, 0)),
        lambda x: np.ascontiguousarray(x.transpose(3, 2, 0, 1)),
    ),
    Rule(r"^patch_embed\.proj\.bias$", "patch_embed/proj/bias", _same, _same),
    Rule(
        _BLOCKS + r"attn\.qkv\.weight$",
        r"\1_\2/attn/qkv/kernel",
        _qkv_kernel,
        lambda x: np.ascontiguousarray(x.reshape(x.shape[0], -1).T),
    ),
    Rule(_BLOCKS + r"attn\.qkv\.bias$", r"\1_\2/attn/qkv/bias", _qkv_bias, lambda x: x.reshape(-1)),
    Rule(
        _BLOCKS + r"attn\.proj\.weight$",
        r"\1_\2/attn/proj/kernel",
        _proj_kernel,
        lambda x: np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T),
    ),
    Rule(_BLOCKS + r"(attn\.proj|mlp\.fc1|mlp\.fc2)\.bias$", r"\1_\2/\3/bias", _same, _same),
    Rule(_BLOCKS + r"(mlp\.fc1|mlp\.fc2)\.weight$", r"\1_\2/\3/kernel", _linear_t, _linear_t),
    Rule(_BLOCKS + r"(norm1|norm2)\.weight$", r"\1_\2/\3/scale", _same, _same),
    Rule(_BLOCKS + r"(norm1|norm2)\.bias$", r"\1_\2/\3/bias", _same, _same),
    Rule(r"^(norm|fc_norm|decoder_norm)\.weight$", r"\1/scale", _same, _same),
    Rule(r"^(norm|fc_norm|decoder_norm)\.bias$", r"\1/bias", _same, _same),
    Rule(r"^(decoder_embed|decoder_pred|head)\.weight$", r"\1/kernel", _linear_t, _linear_t),
    Rule(r"^(decoder_embed|decoder_pred|head)\.bias$", r"\1/bias", _same, _same),
)


def flax_path(torch_key: str) -> tuple[str, Rule]:
    """The Flax path ('a/b/c') and rule for a torch key; KeyError if no rule knows it."""
    for rule in RULES:
        path, n = re.subn(rule.torch, rule.flax, torch_key)
        if n:
            return path.replace(".", "/"), rule
    raise KeyError(torch_key)


def torch_key(path: str) -> str:
    """The torch key for a Flax path: the inverse of `flax_path`."""
    parts = path.split("/")
    if len(parts) == 1:
        return path
    head, leaf = parts[:-1], parts[-1]
    if re.fullmatch(r"(blocks|decoder_blocks)_\d+", head[0]):
        prefix, index = head[0].rsplit("_", 1)
        head = [prefix, index, *head[1:]]
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join([*head, suffix])


def to_flax_array(key: str, value: Array, num_heads: int) -> tuple[str, Array]:
    path, rule = flax_path(key)
    return path, rule.to_flax(value, num_heads)


def to_torch_array(path: str, value: Array) -> tuple[str, Array]:
    key = torch_key(path)
    _, rule = flax_path(key)
    return key, rule.to_torch(value)


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
