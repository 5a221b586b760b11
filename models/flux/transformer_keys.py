"""Key maps between the original BFL FLUX.1 checkpoint (`flux1-dev.safetensors`) and diffusers
`FluxTransformer2DModel`.

The native model (`models/flux/transformer.py`) uses the original names, so an original file loads with no
map (after stripping the `model.diffusion_model.` prefix some repackaged files carry) and a diffusers
`transformer/` folder goes through `diffusers_to_original`. Three things are more than a rename:

- the original fuses q, k and v into one `qkv` projection per stream of a double block (rows q, then k, then v);
- a single block's `linear1` fuses q, k, v and the MLP input projection (rows [d, d, d, mlp_ratio * d]);
- the final layer's modulation is ordered (shift, scale) in the original and (scale, shift) in diffusers, so
  its weight and bias halves are swapped both ways.

The `*_keys` functions map key lists only (no torch; a fused key stands for all its parts). The state-dict
functions move tensors; splitting makes views, fusing and swapping make one new tensor per key (the parts are
dropped as they are consumed). Keys that match no rule pass through unchanged, so the strict load names them;
a fused key whose parts are incomplete is left as its parts for the same reason.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from models.key_maps import (ORIGINAL_PREFIX, PrefixTable, compile_prefix, put_once, strip_original_prefix,
                             strip_prefix)

__all__ = ["ORIGINAL_PREFIX", "diffusers_to_original", "diffusers_to_original_keys", "original_to_diffusers",
           "original_to_diffusers_keys", "strip_original_prefix", "strip_prefix"]

# 1:1 renames, (original, diffusers) key prefixes; "{n}" is a block index, the rest of the key
# (".weight", ".bias", ".scale" -> ".weight") follows.
_ROWS: tuple[tuple[str, str], ...] = (
    ("img_in.", "x_embedder."),
    ("txt_in.", "context_embedder."),
    ("time_in.in_layer.", "time_text_embed.timestep_embedder.linear_1."),
    ("time_in.out_layer.", "time_text_embed.timestep_embedder.linear_2."),
    ("guidance_in.in_layer.", "time_text_embed.guidance_embedder.linear_1."),
    ("guidance_in.out_layer.", "time_text_embed.guidance_embedder.linear_2."),
    ("vector_in.in_layer.", "time_text_embed.text_embedder.linear_1."),
    ("vector_in.out_layer.", "time_text_embed.text_embedder.linear_2."),
    ("double_blocks.{n}.img_mod.lin.", "transformer_blocks.{n}.norm1.linear."),
    ("double_blocks.{n}.txt_mod.lin.", "transformer_blocks.{n}.norm1_context.linear."),
    ("double_blocks.{n}.img_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_q.weight"),
    ("double_blocks.{n}.img_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_k.weight"),
    ("double_blocks.{n}.txt_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_added_q.weight"),
    ("double_blocks.{n}.txt_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_added_k.weight"),
    ("double_blocks.{n}.img_attn.proj.", "transformer_blocks.{n}.attn.to_out.0."),
    ("double_blocks.{n}.txt_attn.proj.", "transformer_blocks.{n}.attn.to_add_out."),
    ("double_blocks.{n}.img_mlp.0.", "transformer_blocks.{n}.ff.net.0.proj."),
    ("double_blocks.{n}.img_mlp.2.", "transformer_blocks.{n}.ff.net.2."),
    ("double_blocks.{n}.txt_mlp.0.", "transformer_blocks.{n}.ff_context.net.0.proj."),
    ("double_blocks.{n}.txt_mlp.2.", "transformer_blocks.{n}.ff_context.net.2."),
    ("single_blocks.{n}.modulation.lin.", "single_transformer_blocks.{n}.norm.linear."),
    ("single_blocks.{n}.norm.query_norm.scale", "single_transformer_blocks.{n}.attn.norm_q.weight"),
    ("single_blocks.{n}.norm.key_norm.scale", "single_transformer_blocks.{n}.attn.norm_k.weight"),
    ("single_blocks.{n}.linear2.", "single_transformer_blocks.{n}.proj_out."),
    ("final_layer.linear.", "proj_out."),
)

# Fused original keys (without ".weight"/".bias") and their diffusers parts, in row order.
_FUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("double_blocks.{n}.img_attn.qkv", ("transformer_blocks.{n}.attn.to_q", "transformer_blocks.{n}.attn.to_k",
                                        "transformer_blocks.{n}.attn.to_v")),
    ("double_blocks.{n}.txt_attn.qkv", ("transformer_blocks.{n}.attn.add_q_proj",
                                        "transformer_blocks.{n}.attn.add_k_proj",
                                        "transformer_blocks.{n}.attn.add_v_proj")),
    ("single_blocks.{n}.linear1", ("single_transformer_blocks.{n}.attn.to_q",
                                   "single_transformer_blocks.{n}.attn.to_k",
                                   "single_transformer_blocks.{n}.attn.to_v",
                                   "single_transformer_blocks.{n}.proj_mlp")),
)

# The final modulation: same rows, halves swapped.
_SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")

_LEAVES = ("weight", "bias")


_RENAME_O2D = PrefixTable(_ROWS, 0)
_RENAME_D2O = PrefixTable(_ROWS, 1)
_FUSED_O = tuple((compile_prefix(o + "."), parts) for o, parts in _FUSED)
_FUSED_D = tuple((compile_prefix(p + "."), o, parts, i) for o, parts in _FUSED for i, p in enumerate(parts))


def _fill(template: str, n: str | None) -> str:
    return template.replace("{n}", n) if n is not None else template


def _split_original(key: str) -> tuple[str, ...] | None:
    """The diffusers keys a fused original key holds (q, k, v[, mlp]), or None if it is not fused."""
    for pattern, parts in _FUSED_O:
        m = pattern.match(key)
        if m and m.group("rest") in _LEAVES:
            return tuple(f"{_fill(p, m.group('n'))}.{m.group('rest')}" for p in parts)
    return None


def _fused_target(key: str) -> tuple[str, tuple[str, ...], int] | None:
    """(fused original key, all its diffusers parts, this key's position) for a diffusers part key."""
    for pattern, original, parts, index in _FUSED_D:
        m = pattern.match(key)
        if m and m.group("rest") in _LEAVES:
            n, leaf = m.group("n"), m.group("rest")
            return f"{_fill(original, n)}.{leaf}", tuple(f"{_fill(p, n)}.{leaf}" for p in parts), index
    return None


def _swap_name(key: str, src: str, dst: str) -> str | None:
    for leaf in _LEAVES:
        if key == f"{src}.{leaf}":
            return f"{dst}.{leaf}"
    return None


# ---- key lists (no torch) ----
def original_to_diffusers_keys(keys: Iterable[str]) -> list[str]:
    """diffusers names for original keys (prefix stripped; a fused key becomes its parts)."""
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
        if fused is not None and all(p in present for p in fused[1]):
            new = fused[0]
        elif fused is not None:
            new = key  # incomplete: left as is, so the strict load reports it
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
    """Original (BFL) state dict -> diffusers names: split fused projections (views), swap the final modulation.

    A single block's `linear1` is split as [d, d, d, rest], with d read from its `modulation.lin` (3d rows).
    """
    sd = {strip_prefix(k): v for k, v in sd.items()}
    out: dict[str, Any] = {}
    for key, value in sd.items():
        parts = _split_original(key)
        if parts is not None:
            if len(parts) == 3:
                pieces = value.chunk(3, dim=0)
            else:
                n = key.split(".")[1]
                mod = sd.get(f"single_blocks.{n}.modulation.lin.weight")
                if mod is None:
                    raise ValueError(f"cannot split {key!r}: single_blocks.{n}.modulation.lin.weight, which gives "
                                     f"the hidden size, is missing")
                d = mod.shape[0] // 3
                pieces = value.split([d, d, d, value.shape[0] - 3 * d], dim=0)
            for part, piece in zip(parts, pieces):
                put_once(out, part, piece, key)
            continue
        swapped = _swap_name(key, *_SWAPPED)
        if swapped is not None:
            put_once(out, swapped, _swap_halves(value), key)
            continue
        put_once(out, _RENAME_O2D.rename(key) or key, value, key)
    return out


def diffusers_to_original(sd: Mapping[str, Any], consume: bool = False) -> dict[str, Any]:
    """diffusers state dict -> original (BFL) names: fuse q/k/v (and the single blocks' MLP input), swap the
    final modulation back to (shift, scale).

    With `consume=True`, `sd` must be a dict and is emptied as its tensors are used: the parts of a fused
    projection are released as soon as the fused copy exists, so loading holds about one copy of the weights.
    """
    import torch

    if consume and not isinstance(sd, dict):
        raise TypeError("consume=True needs a dict to empty")
    out: dict[str, Any] = {}
    done: set[str] = set()  # fused targets already built
    for key in list(sd):
        if key not in sd:
            continue  # a part already fused (and consumed) with its group
        value = sd[key]
        fused = _fused_target(key)
        if fused is not None:
            target, parts, _ = fused
            if target in done:
                continue
            if all(p in sd for p in parts):
                done.add(target)
                put_once(out, target, torch.cat([sd[p] for p in parts], dim=0), key)
                if consume:
                    for p in parts:
                        del sd[p]
                continue
            put_once(out, key, value, key)
        else:
            swapped = _swap_name(key, _SWAPPED[1], _SWAPPED[0])
            if swapped is not None:
                put_once(out, swapped, _swap_halves(value), key)
            else:
                put_once(out, _RENAME_D2O.rename(key) or key, value, key)
        if consume:
            del sd[key]
    return out
