"""Key maps between the two FLUX.1 autoencoder layouts: pure functions on state dicts.

The native parameter names (models.flux.vae) are those of the original `ae.safetensors`
(`encoder.down.N.block.M...`, `mid.attn_1.{q,k,v,proj_out}` as 1x1 convs; `decoder.up.N` is numbered like
`down.N`, highest resolution first, while diffusers' `up_blocks` run in decode order, lowest resolution
first). The diffusers `vae/` folder names:

    encoder.down.i.block.j / .downsample          <-> encoder.down_blocks.i.resnets.j / .downsamplers.0
    decoder.up.(L-1-i).block.j / .upsample        <-> decoder.up_blocks.i.resnets.j / .upsamplers.0
    {encoder,decoder}.mid.block_{1,2}             <-> ...mid_block.resnets.{0,1}
    ...mid.attn_1.{norm,q,k,v,proj_out}           <-> ...mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
    nin_shortcut / norm_out                       <-> conv_shortcut / conv_norm_out

and stores the attention projections as Linear weights (C, C) instead of 1x1 kernels (C, C, 1, 1).
"""

from __future__ import annotations

import re

import torch

from models.flux.vae_config import FluxVAEConfig

__all__ = ["diffusers_to_original", "original_to_diffusers", "strip_original_prefix"]

StateDict = dict[str, torch.Tensor]

# Prefixes some original-layout files put in front of the autoencoder keys (full-pipeline checkpoints).
_ORIGINAL_PREFIXES = ("first_stage_model.", "vae.")
_ATTN_ORIGINAL_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_ORIGINAL = {v: k for k, v in _ATTN_ORIGINAL_TO_DIFFUSERS.items()}
_ATTN_PROJECTIONS = ("q", "k", "v", "proj_out")


def strip_original_prefix(sd: StateDict) -> StateDict:
    """Drop a `first_stage_model.` / `vae.` prefix when every key carries it."""
    for prefix in _ORIGINAL_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _original_name(key: str, num_levels: int) -> str:
    """One diffusers key -> its original name (unknown keys pass through, so strict loading reports them)."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)

    def up(m: re.Match[str]) -> str:
        part = "block" if m.group(2) == "resnets" else "upsample"
        return f"decoder.up.{num_levels - 1 - int(m.group(1))}.{part}."

    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", up, key)
    key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", key)
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", key)
    if m:
        key = f"{m.group(1)}.mid.attn_1.{_ATTN_DIFFUSERS_TO_ORIGINAL[m.group(2)]}.{m.group(3)}"
    return key


def _diffusers_name(key: str, num_levels: int) -> str:
    """One original key -> its diffusers name (inverse of `_original_name`)."""
    m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(\w+)$", key)
    if m:
        return f"{m.group(1)}.mid_block.attentions.0.{_ATTN_ORIGINAL_TO_DIFFUSERS[m.group(2)]}.{m.group(3)}"
    key = key.replace("nin_shortcut", "conv_shortcut").replace(".norm_out.", ".conv_norm_out.")
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)

    def up(m: re.Match[str]) -> str:
        part = "resnets" if m.group(2) == "block" else "upsamplers.0"
        return f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.{part}."

    return re.sub(r"^decoder\.up\.(\d+)\.(block|upsample)\.", up, key)


def _is_attn_projection_weight(original_key: str) -> bool:
    return bool(re.match(rf"^(encoder|decoder)\.mid\.attn_1\.({'|'.join(_ATTN_PROJECTIONS)})\.weight$", original_key))


def diffusers_to_original(sd: StateDict, config: FluxVAEConfig) -> StateDict:
    """A diffusers AutoencoderKL state dict -> original names; Linear attention weights become 1x1 kernels."""
    levels = len(config.block_out_channels)
    out: StateDict = {}
    for key, value in sd.items():
        name = _original_name(key, levels)
        if _is_attn_projection_weight(name) and value.ndim == 2:
            value = value[:, :, None, None]
        out[name] = value
    return out


def original_to_diffusers(sd: StateDict, config: FluxVAEConfig) -> StateDict:
    """An original `ae.safetensors` state dict -> diffusers AutoencoderKL names and Linear attention weights."""
    levels = len(config.block_out_channels)
    out: StateDict = {}
    for key, value in strip_original_prefix(sd).items():
        if _is_attn_projection_weight(key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[_diffusers_name(key, levels)] = value
    return out
