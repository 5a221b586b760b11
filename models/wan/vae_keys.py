"""Key maps between the original `Wan2.1_VAE.pth` (194 keys at base width 96) and diffusers `AutoencoderKLWan`.

`WanVAE` uses the original names, so only the diffusers layout needs mapping. Both directions are
pure functions of the key and the config; keys that match no rule pass through unchanged so that the
strict load names them.

Index rules:
- encoder: `encoder.downsamples.{i}` <-> `encoder.down_blocks.{i}` (flat index kept);
- decoder: `decoder.upsamples.{i}` <-> `decoder.up_blocks.{b}.resnets.{r}` / `.upsamplers.0`, where each
  up block holds `num_res_blocks + 1` residual blocks followed by one resample (the last block has none),
  so i = b * (num_res_blocks + 2) + r, and the resample sits at r = num_res_blocks + 1.
"""

from __future__ import annotations

import re
from typing import Mapping, TypeVar

from models.wan.config import WanVAEConfig

V = TypeVar("V")

# Inside every residual block: (original prefix, diffusers prefix).
_RESIDUAL_PARTS: tuple[tuple[str, str], ...] = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)

# Fixed module paths: (original prefix, diffusers prefix). Longer prefixes first.
_FIXED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("encoder.conv1.", "encoder.conv_in."),
    ("decoder.conv1.", "decoder.conv_in."),
    ("encoder.head.0.", "encoder.norm_out."),
    ("encoder.head.2.", "encoder.conv_out."),
    ("decoder.head.0.", "decoder.norm_out."),
    ("decoder.head.2.", "decoder.conv_out."),
    ("encoder.middle.1.", "encoder.mid_block.attentions.0."),
    ("decoder.middle.1.", "decoder.mid_block.attentions.0."),
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
)

_ORIG_MIDDLE_RES = re.compile(r"^(encoder|decoder)\.middle\.([02])\.(.+)$")
_ORIG_DOWN = re.compile(r"^encoder\.downsamples\.(\d+)\.(.+)$")
_ORIG_UP = re.compile(r"^decoder\.upsamples\.(\d+)\.(.+)$")

_DIFF_MIDDLE_RES = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$")
_DIFF_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.+)$")
_DIFF_UP_RES = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_DIFF_UP_SAMPLER = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$")


def _rename_residual(rest: str, to_diffusers: bool) -> str:
    """Rename the part of a key below a residual block; resample/time_conv parts are left alone."""
    for orig, diff in _RESIDUAL_PARTS:
        src, dst = (orig, diff) if to_diffusers else (diff, orig)
        if rest.startswith(src):
            return dst + rest[len(src):]
    return rest


def original_key_to_diffusers(key: str, config: WanVAEConfig) -> str:
    """One original key -> its diffusers name (unknown keys unchanged)."""
    if m := _ORIG_MIDDLE_RES.match(key):
        part, idx, rest = m.groups()
        return f"{part}.mid_block.resnets.{int(idx) // 2}.{_rename_residual(rest, True)}"
    if m := _ORIG_DOWN.match(key):
        idx, rest = m.groups()
        return f"encoder.down_blocks.{idx}.{_rename_residual(rest, True)}"
    if m := _ORIG_UP.match(key):
        idx, rest = int(m.group(1)), m.group(2)
        per_block = config.num_res_blocks + 2
        block, pos = divmod(idx, per_block)
        if pos <= config.num_res_blocks:
            return f"decoder.up_blocks.{block}.resnets.{pos}.{_rename_residual(rest, True)}"
        return f"decoder.up_blocks.{block}.upsamplers.0.{rest}"
    for orig, diff in _FIXED_PREFIXES:
        if key.startswith(orig):
            return diff + key[len(orig):]
    return key


def diffusers_key_to_original(key: str, config: WanVAEConfig) -> str:
    """One diffusers key -> its original name (unknown keys unchanged)."""
    if m := _DIFF_MIDDLE_RES.match(key):
        part, idx, rest = m.groups()
        return f"{part}.middle.{int(idx) * 2}.{_rename_residual(rest, False)}"
    if m := _DIFF_DOWN.match(key):
        idx, rest = m.groups()
        return f"encoder.downsamples.{idx}.{_rename_residual(rest, False)}"
    per_block = config.num_res_blocks + 2
    if m := _DIFF_UP_RES.match(key):
        block, pos, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"decoder.upsamples.{block * per_block + pos}.{_rename_residual(rest, False)}"
    if m := _DIFF_UP_SAMPLER.match(key):
        block, rest = int(m.group(1)), m.group(2)
        return f"decoder.upsamples.{block * per_block + config.num_res_blocks + 1}.{rest}"
    for orig, diff in _FIXED_PREFIXES:
        if key.startswith(diff):
            return orig + key[len(diff):]
    return key


def _remap(sd: Mapping[str, V], config: WanVAEConfig, to_diffusers: bool) -> dict[str, V]:
    rename = original_key_to_diffusers if to_diffusers else diffusers_key_to_original
    out: dict[str, V] = {}
    for key, value in sd.items():
        new = rename(key, config)
        if new in out:
            raise ValueError(f"VAE keys collide after renaming: {key!r} -> {new!r} is produced twice")
        out[new] = value
    return out


def original_to_diffusers(sd: Mapping[str, V], config: WanVAEConfig) -> dict[str, V]:
    """Original `Wan2.1_VAE.pth` state dict -> diffusers `AutoencoderKLWan` names (values untouched)."""
    return _remap(sd, config, to_diffusers=True)


def diffusers_to_original(sd: Mapping[str, V], config: WanVAEConfig) -> dict[str, V]:
    """Diffusers `AutoencoderKLWan` state dict -> original `Wan2.1_VAE.pth` names (values untouched)."""
    return _remap(sd, config, to_diffusers=False)
