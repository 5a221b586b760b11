"""Key maps between the original BFL FLUX.2 checkpoint (e.g. `flux-2-klein-4b.safetensors`) and diffusers
`Flux2Transformer2DModel`, whose names the native model (`models/flux2/transformer.py`) uses.

A diffusers `transformer/` folder therefore loads with no map, and an original file goes through
`original_to_diffusers` (after stripping the `model.diffusion_model.` prefix some repackaged files carry).
Two things are more than a rename (the rules of diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`):

- a double block fuses q, k and v into one `qkv` projection per stream (rows q, then k, then v); diffusers
  keeps `to_q` / `to_k` / `to_v` (image) and `add_q_proj` / `add_k_proj` / `add_v_proj` (text);
- the final layer's modulation is ordered (shift, scale) in the original and (scale, shift) in diffusers, so
  its row halves are swapped both ways.

Unlike FLUX.1, a single block's fused `linear1` / `linear2` are only renamed (diffusers keeps them fused as
`attn.to_qkv_mlp_proj` / `attn.to_out`). The `*_keys` functions map key lists only (no torch; a fused key
stands for all its parts). Keys that match no rule pass through unchanged, so the strict load names them; a
fused key whose parts are incomplete is left as its parts for the same reason.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from models.key_maps import (ORIGINAL_PREFIX, PrefixTable, compile_prefix, put_once, strip_original_prefix,
                             strip_prefix)

__all__ = ["ORIGINAL_PREFIX", "diffusers_to_original", "diffusers_to_original_keys", "original_to_diffusers",
           "original_to_diffusers_keys", "strip_original_prefix", "strip_prefix"]

# 1:1 renames, (original, diffusers) key prefixes; "{n}" is a block index; a row without a trailing "." names a
# whole key (BFL's RMSNorm `.scale` is diffusers' `.weight`).
_ROWS: tuple[tuple[str, str], ...] = (
    ("img_in.", "x_embedder."),
    ("txt_in.", "context_embedder."),
    ("time_in.in_layer.", "time_guidance_embed.timestep_embedder.linear_1."),
    ("time_in.out_layer.", "time_guidance_embed.timestep_embedder.linear_2."),
    ("guidance_in.in_layer.", "time_guidance_embed.guidance_embedder.linear_1."),
    ("guidance_in.out_layer.", "time_guidance_embed.guidance_embedder.linear_2."),
    ("double_stream_modulation_img.lin.", "double_stream_modulation_img.linear."),
    ("double_stream_modulation_txt.lin.", "double_stream_modulation_txt.linear."),
    ("single_stream_modulation.lin.", "single_stream_modulation.linear."),
    ("double_blocks.{n}.img_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_q.weight"),
    ("double_blocks.{n}.img_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_k.weight"),
    ("double_blocks.{n}.txt_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_added_q.weight"),
    ("double_blocks.{n}.txt_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_added_k.weight"),
    ("double_blocks.{n}.img_attn.proj.", "transformer_blocks.{n}.attn.to_out.0."),
    ("double_blocks.{n}.txt_attn.proj.", "transformer_blocks.{n}.attn.to_add_out."),
    ("double_blocks.{n}.img_mlp.0.", "transformer_blocks.{n}.ff.linear_in."),
    ("double_blocks.{n}.img_mlp.2.", "transformer_blocks.{n}.ff.linear_out."),
    ("double_blocks.{n}.txt_mlp.0.", "transformer_blocks.{n}.ff_context.linear_in."),
    ("double_blocks.{n}.txt_mlp.2.", "transformer_blocks.{n}.ff_context.linear_out."),
    ("single_blocks.{n}.linear1.", "single_transformer_blocks.{n}.attn.to_qkv_mlp_proj."),
    ("single_blocks.{n}.linear2.", "single_transformer_blocks.{n}.attn.to_out."),
    ("single_blocks.{n}.norm.query_norm.scale", "single_transformer_blocks.{n}.attn.norm_q.weight"),
    ("single_blocks.{n}.norm.key_norm.scale", "single_transformer_blocks.{n}.attn.norm_k.weight"),
    ("final_layer.linear.", "proj_out."),
)

# Fused original keys (without ".weight"/".bias") and their diffusers parts, in row order.
_FUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("double_blocks.{n}.img_attn.qkv", ("transformer_blocks.{n}.attn.to_q", "transformer_blocks.{n}.attn.to_k",
                                        "transformer_blocks.{n}.attn.to_v")),
    ("double_blocks.{n}.txt_attn.qkv", ("transformer_blocks.{n}.attn.add_q_proj",
                                        "transformer_blocks.{n}.attn.add_k_proj",
                                        "transformer_blocks.{n}.attn.add_v_proj")),
)

# The final modulation: (original, diffusers), same rows, halves swapped.
_SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")

_LEAVES = ("weight", "bias")

_RENAME_O2D = PrefixTable(_ROWS, 0)
_RENAME_D2O = PrefixTable(_ROWS, 1)
_FUSED_O = tuple((compile_prefix(o + "."), parts) for o, parts in _FUSED)
_FUSED_D = tuple((compile_prefix(p + "."), o, parts) for o, parts in _FUSED for p in parts)


def _fill(template: str, n: str | None) -> str:
    return template.replace("{n}", n) if n is not None else template


def _split_original(key: str) -> tuple[str, ...] | None:
    """The diffusers keys (q, k, v) a fused original key holds, or None if it is not fused."""
    for pattern, parts in _FUSED_O:
        m = pattern.match(key)
        if m and m.group("rest") in _LEAVES:
            return tuple(f"{_fill(p, m.group('n'))}.{m.group('rest')}" for p in parts)
    return None


def _fused_target(key: str) -> tuple[str, tuple[str, ...]] | None:
    """(fused original key, all its diffusers parts) for a diffusers part key, or None."""
    for pattern, original, parts in _FUSED_D:
        m = pattern.match(key)
        if m and m.group("rest") in _LEAVES:
            n, leaf = m.group("n"), m.group("rest")
            return f"{_fill(original, n)}.{leaf}", tuple(f"{_fill(p, n)}.{leaf}" for p in parts)
    return None


def _swap_name(key: str, src: str, dst: str) -> str | None:
    for leaf in _LEAVES:
        if key == f"{src}.{leaf}":
            return f"{dst}.{leaf}"
    return None


# ---- key lists (no torch) ----
def original_to_diffusers_keys(keys: Iterable[str]) -> list[str]:
    """diffusers names for original keys (prefix stripped; a fused qkv key becomes its three parts)."""
    out: list[str] = []
    for key in keys:
        key = strip_prefix(key)
        parts = _split_original(key)
        if parts is not None:
            out.extend(parts)
            continue
        out.append(_swap_name(key, *_SWAPPED) or _RENAME_O2D.rename(key) or key)
    return out


def diffusers_to_original_keys(keys: Iterable[str]) -> list[str]:
    """Original names for diffusers keys (the parts of a fused key become one key, where all are present)."""
    keys = list(keys)
    present = set(keys)
    out: list[str] = []
    seen: set[str] = set()
    for key in keys:
        fused = _fused_target(key)
        if fused is not None:
            new = fused[0] if all(p in present for p in fused[1]) else key  # incomplete: left for the strict load
        else:
            new = _swap_name(key, _SWAPPED[1], _SWAPPED[0]) or _RENAME_D2O.rename(key) or key
        if new not in seen:
            seen.add(new)
            out.append(new)
    return out


# ---- state dicts ----
def _swap_halves(value: Any) -> Any:
    import torch

    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def original_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Original (BFL) state dict -> diffusers names: split the fused q/k/v (views), swap the final modulation."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        name = strip_prefix(key)
        parts = _split_original(name)
        if parts is not None:
            for part, piece in zip(parts, value.chunk(3, dim=0)):
                put_once(out, part, piece, key)
            continue
        swapped = _swap_name(name, *_SWAPPED)
        if swapped is not None:
            put_once(out, swapped, _swap_halves(value), key)
            continue
        put_once(out, _RENAME_O2D.rename(name) or name, value, key)
    return out


def diffusers_to_original(sd: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers state dict -> original (BFL) names: fuse q/k/v per stream, swap the final modulation back to
    (shift, scale). Parts of an incomplete fusion keep their names."""
    import torch

    out: dict[str, Any] = {}
    for key, value in sd.items():
        fused = _fused_target(key)
        if fused is not None:
            target, parts = fused
            if all(p in sd for p in parts):
                if key == parts[0]:
                    put_once(out, target, torch.cat([sd[p] for p in parts], dim=0), key)
                continue
            put_once(out, key, value, key)
            continue
        swapped = _swap_name(key, _SWAPPED[1], _SWAPPED[0])
        if swapped is not None:
            put_once(out, swapped, _swap_halves(value), key)
        else:
            put_once(out, _RENAME_D2O.rename(key) or key, value, key)
    return out
