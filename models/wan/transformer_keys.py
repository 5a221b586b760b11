"""Key maps between the original Wan DiT checkpoint and diffusers `WanTransformer3DModel`.

The native model (`models/wan/transformer.py`) uses the original names, so an original checkpoint
loads with no map and a diffusers `transformer/` folder goes through `diffusers_to_original`.
Both functions are pure: each key is matched against one table row (no chained substring
replacement, so the norm2/norm3 swap cannot apply twice) and keys that match no row pass
through unchanged, so the strict load names them.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

from models.key_maps import ORIGINAL_PREFIX, PrefixTable, put_once, strip_original_prefix, strip_prefix

V = TypeVar("V")

__all__ = ["ORIGINAL_PREFIX", "diffusers_to_original", "original_to_diffusers", "strip_original_prefix", "strip_prefix"]

# (original, diffusers) key prefixes; "{n}" is a block index. Each row maps a prefix and keeps the rest
# of the key (".weight", ".bias" or nothing for bare parameters such as "modulation").
_ROWS: tuple[tuple[str, str], ...] = (
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("blocks.{n}.self_attn.q.", "blocks.{n}.attn1.to_q."),
    ("blocks.{n}.self_attn.k.", "blocks.{n}.attn1.to_k."),
    ("blocks.{n}.self_attn.v.", "blocks.{n}.attn1.to_v."),
    ("blocks.{n}.self_attn.o.", "blocks.{n}.attn1.to_out.0."),
    ("blocks.{n}.self_attn.norm_q.", "blocks.{n}.attn1.norm_q."),
    ("blocks.{n}.self_attn.norm_k.", "blocks.{n}.attn1.norm_k."),
    # The affine cross-attention LayerNorm is norm3 in Wan and norm2 in diffusers (the FFN norms have no keys).
    ("blocks.{n}.norm3.", "blocks.{n}.norm2."),
    ("blocks.{n}.cross_attn.q.", "blocks.{n}.attn2.to_q."),
    ("blocks.{n}.cross_attn.k.", "blocks.{n}.attn2.to_k."),
    ("blocks.{n}.cross_attn.v.", "blocks.{n}.attn2.to_v."),
    ("blocks.{n}.cross_attn.o.", "blocks.{n}.attn2.to_out.0."),
    ("blocks.{n}.cross_attn.norm_q.", "blocks.{n}.attn2.norm_q."),
    ("blocks.{n}.cross_attn.norm_k.", "blocks.{n}.attn2.norm_k."),
    # Image-to-video extras: mapped so that an I2V checkpoint is reported by its original names.
    ("blocks.{n}.cross_attn.k_img.", "blocks.{n}.attn2.add_k_proj."),
    ("blocks.{n}.cross_attn.v_img.", "blocks.{n}.attn2.add_v_proj."),
    ("blocks.{n}.cross_attn.norm_k_img.", "blocks.{n}.attn2.norm_added_k."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("blocks.{n}.ffn.0.", "blocks.{n}.ffn.net.0.proj."),
    ("blocks.{n}.ffn.2.", "blocks.{n}.ffn.net.2."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
)


_ORIGINAL_TO_DIFFUSERS = PrefixTable(_ROWS, 0)
_DIFFUSERS_TO_ORIGINAL = PrefixTable(_ROWS, 1)


def _map(sd: Mapping[str, V], table: PrefixTable) -> dict[str, V]:
    out: dict[str, V] = {}
    for key, value in sd.items():
        stripped = strip_prefix(key)
        put_once(out, table.rename(stripped) or stripped, value, key)
    return out


def original_to_diffusers(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename original Wan keys (optionally prefixed `model.diffusion_model.`) to diffusers names."""
    return _map(sd, _ORIGINAL_TO_DIFFUSERS)


def diffusers_to_original(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename diffusers `WanTransformer3DModel` keys to the original Wan names the native model uses."""
    return _map(sd, _DIFFUSERS_TO_ORIGINAL)


