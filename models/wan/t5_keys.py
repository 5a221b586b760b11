"""Key maps between Wan's umT5 encoder checkpoint and transformers' `UMT5EncoderModel`.

Wan ships the encoder as `models_t5_umt5-xxl-enc-bf16.pth` with its own module names
(`wan/modules/t5.py`); we run it through transformers' `UMT5EncoderModel`, which has the same math
(docs/wan-model.md, "Text encoder"). The maps are pure functions on state dicts so they can be tested on
key lists and reused by converters; loading and shape checks live in `models.loading.load_strict`.
"""

from __future__ import annotations

import re
from typing import Mapping, TypeVar

from transformers import UMT5Config

from models.errors import CheckpointError

V = TypeVar("V")

#: Key of the (tied) token embedding on both sides.
WAN_EMBEDDING = "token_embedding.weight"
HF_SHARED = "shared.weight"
HF_EMBED_TOKENS = "encoder.embed_tokens.weight"

# Per-block suffixes: Wan `blocks.{i}.<wan>` <-> transformers `encoder.block.{i}.<hf>`.
_BLOCK_KEYS: dict[str, str] = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEYS_REVERSED = {hf: wan for wan, hf in _BLOCK_KEYS.items()}
_GLOBAL_KEYS: dict[str, str] = {"norm.weight": "encoder.final_layer_norm.weight"}
_GLOBAL_KEYS_REVERSED = {hf: wan for wan, hf in _GLOBAL_KEYS.items()}

_WAN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")

# Fixed by the umT5 architecture and not recoverable from tensor shapes.
RELATIVE_ATTENTION_MAX_DISTANCE = 128
LAYER_NORM_EPS = 1e-6


def wan_t5_to_transformers(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename Wan umT5 keys to `UMT5EncoderModel` keys (values are passed through untouched).

    `token_embedding.weight` becomes both `shared.weight` and `encoder.embed_tokens.weight` (the same
    object under two names: transformers ties them). Unknown keys raise, so a wrong file fails here
    with the key named rather than later as a vague missing-key list.
    """
    out: dict[str, V] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key == WAN_EMBEDDING:
            out[HF_SHARED] = value
            out[HF_EMBED_TOKENS] = value
        elif key in _GLOBAL_KEYS:
            out[_GLOBAL_KEYS[key]] = value
        elif (m := _WAN_BLOCK.match(key)) and m.group(2) in _BLOCK_KEYS:
            out[f"encoder.block.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"keys that are not part of Wan's umT5 encoder: {sorted(unknown)[:10]}")
    return out


def transformers_to_wan_t5(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename `UMT5EncoderModel` keys to Wan umT5 keys (inverse of `wan_t5_to_transformers`).

    Either tied name may be present (transformers' own `save_pretrained` writes only `shared.weight`);
    when both are, `shared.weight` is used.
    """
    out: dict[str, V] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key == HF_SHARED or (key == HF_EMBED_TOKENS and HF_SHARED not in sd):
            out[WAN_EMBEDDING] = value
        elif key == HF_EMBED_TOKENS:
            continue
        elif key in _GLOBAL_KEYS_REVERSED:
            out[_GLOBAL_KEYS_REVERSED[key]] = value
        elif (m := _HF_BLOCK.match(key)) and m.group(2) in _BLOCK_KEYS_REVERSED:
            out[f"blocks.{m.group(1)}.{_BLOCK_KEYS_REVERSED[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"keys that are not part of UMT5EncoderModel: {sorted(unknown)[:10]}")
    return out


def _shape(sd: Mapping[str, object], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"cannot infer the umT5 config: key {key!r} is missing from the Wan state dict")
    return tuple(sd[key].shape)  # type: ignore[attr-defined]


def umt5_config_from_wan_state_dict(sd: Mapping[str, object]) -> UMT5Config:
    """The `UMT5Config` whose encoder matches a Wan umT5 state dict, read off the tensor shapes.

    Wan's `.pth` carries no config, so vocab/width/depth/heads come from the shapes
    (heads from `pos_embedding` [buckets, heads]); max distance and eps are architectural constants.
    Release file: vocab 256384, d_model 4096, d_ff 10240, 24 layers, 64 heads, d_kv 64.
    """
    vocab_size, d_model = _shape(sd, WAN_EMBEDDING)
    buckets, num_heads = _shape(sd, "blocks.0.pos_embedding.embedding.weight")
    inner_dim = _shape(sd, "blocks.0.attn.q.weight")[0]
    d_ff = _shape(sd, "blocks.0.ffn.fc1.weight")[0]
    layers = sorted({int(m.group(1)) for k in sd if (m := _WAN_BLOCK.match(k))})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"Wan umT5 blocks are not numbered 0..n-1: found block indices {layers}")
    if inner_dim % num_heads:
        raise CheckpointError(
            f"attention width ({inner_dim}, from blocks.0.attn.q.weight) is not divisible by the head count "
            f"({num_heads}, from blocks.0.pos_embedding.embedding.weight)"
        )
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        d_ff=d_ff,
        num_layers=len(layers),
        num_heads=num_heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=RELATIVE_ATTENTION_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=LAYER_NORM_EPS,
        architectures=["UMT5EncoderModel"],
    )
