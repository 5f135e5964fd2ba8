"""transformers' on-disk key layout of ViT / ViT-MAE <-> the original (`.pth`, timm) layout.

What `save_pretrained` writes and the hub ships (transformers 4 names; transformers 5
loads them as they are), for the four classes this project reads and writes:

| class                        | encoder prefix | beyond the encoder                            |
|------------------------------|----------------|-----------------------------------------------|
| `ViTMAEForPreTraining`       | `vit.`         | `decoder.*` (decoder_embed, mask_token, ...)  |
| `ViTMAEModel`                | none           | nothing                                       |
| `ViTModel`                   | none           | `pooler.dense.*` (its tanh pooler: `pooler.*`)|
| `ViTForImageClassification`  | `vit.`         | `classifier.*` (the head on the cls token)    |

One template table, read both ways, maps the names; the only change of values is the
fused `qkv` of the original, split into `query`, `key`, `value` one way and concatenated
the other, so a round trip is bit for bit. transformers 5 writes the decoder's blocks as
`decoder.decoder_encoder.layer.N.*` where 4 wrote `decoder.decoder_layers.N.*`; both
are read, and the hub's (4's) form is written, which every version loads.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np

from convert.table import ConversionError

# The classes, and the prefix of the encoder's keys inside each.
ENCODER_PREFIX = {"ViTMAEForPreTraining": "vit.", "ViTMAEModel": "", "ViTModel": "", "ViTForImageClassification": "vit."}
MODEL_TYPE = {"ViTMAEForPreTraining": "vit_mae", "ViTMAEModel": "vit_mae", "ViTModel": "vit",
              "ViTForImageClassification": "vit"}  # fmt: skip
# ViTModel's pooler (dense + tanh on the cls token; the JAX ViT's `pooler=True`).
POOLER = "pooler.dense."
# transformers 5's names of the decoder's blocks -> the hub's.
_RENAMED = (("decoder.decoder_encoder.layer.", "decoder.decoder_layers."),)
_QKV = ("query", "key", "value")  # the order of their rows in the fused qkv

# (.pth template, hub template): {e} is the encoder's prefix, {i} a block index, {w} 'weight' or 'bias'.
_BLOCKS = (("blocks", "{e}encoder.layer"), ("decoder_blocks", "decoder.decoder_layers"))
_IN_BLOCK = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))  # fmt: skip
_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("cls_token", "{e}embeddings.cls_token"),
    ("pos_embed", "{e}embeddings.position_embeddings"),
    ("patch_embed.proj.{w}", "{e}embeddings.patch_embeddings.projection.{w}"),
    ("norm.{w}", "{e}layernorm.{w}"),
    ("head.{w}", "classifier.{w}"),
    ("pooler.{w}", "pooler.dense.{w}"),
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.decoder_pos_embed"),
    ("decoder_embed.{w}", "decoder.decoder_embed.{w}"),
    ("decoder_norm.{w}", "decoder.decoder_norm.{w}"),
    ("decoder_pred.{w}", "decoder.decoder_pred.{w}"),
    *((f"{b}.{{i}}.{p}.{{w}}", f"{h}.{{i}}.{q}.{{w}}") for b, h in _BLOCKS for p, q in _IN_BLOCK),
    # The fused qkv: split into query, key, value one way, concatenated the other.
    *((f"{b}.{{i}}.attn.qkv.{{w}}", f"{h}.{{i}}.attention.attention.{{qkv}}.{{w}}") for b, h in _BLOCKS),
)
_FIELDS = {"i": r"(?P<i>\d+)", "w": r"(?P<w>weight|bias)", "qkv": r"(?P<qkv>query|key|value)"}


def is_hub_layout(keys: Iterable[str]) -> bool:
    """Whether state-dict keys are transformers' (`vit.embeddings...`, `embeddings...`, `decoder...`)."""
    return any(re.match(r"(vit\.)?embeddings\.", key) for key in keys)


def class_from_keys(keys: Iterable[str]) -> str:
    """The transformers class a hub-layout state dict was saved from (ViTMAEModel for a bare encoder)."""
    keys = list(keys)
    if any(key.startswith("decoder.") for key in keys):
        return "ViTMAEForPreTraining"
    if any(key.startswith("classifier.") for key in keys):
        return "ViTForImageClassification"
    if any(key.startswith("vit.") for key in keys):
        raise ConversionError("a 'vit.'-prefixed state dict with neither a decoder nor a classifier")
    return "ViTModel" if any(key.startswith(POOLER) for key in keys) else "ViTMAEModel"


def hub_to_pth(tensors: Mapping[str, np.ndarray], hf_class: str) -> OrderedDict[str, np.ndarray]:
    """The `.pth`-layout state dict of a hub-layout one (query, key, value joined into qkv)."""
    prefix = ENCODER_PREFIX[hf_class]
    tensors = {_hub_name(key): value for key, value in tensors.items()}
    out, parts = OrderedDict(), {}
    for key, value in tensors.items():
        fields, template = _match(key, 1, prefix)
        name = template.format(**fields)
        if "qkv" in fields:
            group = parts.setdefault(name, {})
            group[fields["qkv"]] = value
            if len(group) < len(_QKV):
                continue
            value = np.concatenate([group[part] for part in _QKV])
        out[name] = value
    incomplete = [name for name, group in parts.items() if len(group) < len(_QKV)]
    if incomplete:
        raise ConversionError(f"query, key and value are not all there for {incomplete[0]}")
    return out


def pth_to_hub(state_dict: Mapping[str, np.ndarray], hf_class: str) -> OrderedDict[str, np.ndarray]:
    """The hub-layout state dict of `hf_class` from a `.pth`-layout one (qkv split)."""
    prefix = ENCODER_PREFIX[hf_class]
    out = OrderedDict()
    for key, value in state_dict.items():
        fields, template = _match(key, 0, prefix)
        if "{qkv}" in template:
            for name, part in zip(_QKV, np.split(value, 3), strict=True):
                out[template.format(qkv=name, **fields)] = np.ascontiguousarray(part)
        else:
            out[template.format(**fields)] = value
    return out


def _hub_name(key: str) -> str:
    """A key as the hub writes it (transformers 5's decoder block names renamed)."""
    for new, old in _RENAMED:
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def _match(key: str, side: int, encoder_prefix: str) -> tuple[dict[str, str], str]:
    """(placeholder values, the other side's template) for `key` on `side` (0 .pth, 1 hub)."""
    for pair in _TEMPLATES:
        template = pair[side].replace("{e}", encoder_prefix)
        pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**_FIELDS)
        match = re.fullmatch(pattern, key)
        if match:
            return match.groupdict(), pair[1 - side].replace("{e}", encoder_prefix)
    side_name = ".pth" if side == 0 else "transformers"
    raise ConversionError(f"{side_name} key {key!r} has no place in the other layout")
