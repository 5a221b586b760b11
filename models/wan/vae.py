"""Wan2.1 VAE (`wan/modules/vae.py`, = Wan2.2 `vae2_1.py`) with the reference math (docs/wan-model.md, "VAE").

Read top-down: causal conv and its per-call cache -> RMS norm -> residual / attention / resample
blocks -> encoder -> decoder -> `WanVAE` (chunked encode, frame-by-frame decode, loading).

Parameter names equal the keys of the original `Wan2.1_VAE.pth`, so that file loads without a key
map; the diffusers layout goes through `models.wan.vae_keys`.

The causal state of one encode or decode call lives in a `FeatureCache` created by that call and
passed down the forward; nothing is kept on the modules between calls. The reference keeps the same
state in a list indexed by a running counter in forward order; keying slots by module gives the same
numbers because every cached conv runs exactly once per chunk.

The cache also carries a `SpatialSplit`: the seam through which a decode split into horizontal strips
(one per rank, `parallel.vae_decode`) gets its neighbours' boundary rows for every 3x3 conv and the
full frame for the mid-block attention. The default split is the unsplit, single-rank decode.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.loading import (
    CheckpointError,
    StateDict,
    load_safetensors_dir,
    load_strict,
    load_weights_file,
    meta_device,
    save_safetensors_sharded,
)
from models.wan.config import WanVAEConfig
from models.wan.vae_keys import diffusers_to_original, original_to_diffusers

logger = logging.getLogger(__name__)

CACHE_T = 2
"""Frames of input a cached causal conv keeps from the previous chunk (its temporal kernel is 3)."""

ORIGINAL_FILENAME = "Wan2.1_VAE.pth"
DIFFUSERS_CLASS = "AutoencoderKLWan"
# Qwen-Image's VAE is this network with the same keys; its config.json names `input_channels` for in/out_channels.
DIFFUSERS_CLASSES = (DIFFUSERS_CLASS, "AutoencoderKLQwenImage")

# Marks an upsample3d slot after its first call, which skips time_conv ('Rep' in the reference).
_FIRST_FRAME_DONE = object()


# ---------------------------------------------------------------------------------------------
# 1. Causal convolution, the spatial split and the per-call cache
# ---------------------------------------------------------------------------------------------
class SpatialSplit:
    """How the rows (H, dim -2) of one decode are split into strips; this base class is the unsplit case.

    A strip-parallel decode (`parallel.vae_decode.RowSplit`) overrides the three operations so that
    every strip computes exactly the rows a single-rank decode would: 3x3 convs see their neighbours'
    boundary rows instead of zeros, and the attention block sees the full frame. The overrides here
    return their input unchanged (or do the plain zero padding), so the single-rank decode runs the
    same kernels on the same tensors as without the seam.
    """

    splits_rows = False
    """True when the rows are split; a Conv2d then pads H through `pad` instead of internally."""

    def pad(self, x: torch.Tensor, padding: tuple[int, ...] | list[int]) -> torch.Tensor:
        """F.pad(x, padding) with zeros, except that the H rows (padding[2], padding[3]) come from the
        neighbouring strips (zeros only at the image's top and bottom edges). Unsplit: plain F.pad."""
        return F.pad(x, padding)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This strip (..., h, W) -> the full frame (..., H, W), all strips in order. Unsplit: x itself."""
        return x

    def local_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The full frame (..., H, W) -> this strip's rows (..., h, W). Unsplit: x itself."""
        return x


class FeatureCache:
    """Causal state of one encode or decode call: per cached module, what it keeps from the last chunk.

    A slot holds the last `CACHE_T` input frames of a causal conv (or a marker for upsample3d).
    One instance per call. `spatial` says how the call's rows are split; in a strip-parallel decode
    each rank has its own cache holding only its strip's rows (the time axis is never split, so the
    causal state stays local and only the spatial padding needs the neighbours).
    """

    def __init__(self, spatial: SpatialSplit | None = None) -> None:
        self._slots: dict[nn.Module, Any] = {}
        self.spatial = spatial if spatial is not None else SpatialSplit()

    def get(self, module: nn.Module) -> Any:
        return self._slots.get(module)

    def put(self, module: nn.Module, value: Any) -> None:
        self._slots[module] = value

    def __len__(self) -> int:
        return len(self._slots)


def _carry(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """The frames to cache after `x`: its last CACHE_T frames, topped up with the previous chunk's last frame."""
    carry = x[:, :, -CACHE_T:].clone()
    if carry.shape[2] < CACHE_T and prev is not None:
        carry = torch.cat([prev[:, :, -1:], carry], dim=2)
    return carry


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only at the front in time (2 * p_t frames) and symmetrically in space, with zeros.

    Frames from the previous chunk, when given, replace that many frames of front padding. The
    padding goes through the cache's `SpatialSplit`, so a strip gets its neighbours' rows (of the
    previous chunk's frames too) in place of the H zeros.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self._causal_padding = (pw, pw, ph, ph, 2 * pt, 0)

    def conv(self, x: torch.Tensor, prev: torch.Tensor | None = None,
             spatial: SpatialSplit | None = None) -> torch.Tensor:
        """x: (B, C, T, H, W); prev: (B, C, t<=2, H, W) frames preceding x, or None for zeros;
        spatial: where the H padding comes from (None: zeros)."""
        padding = list(self._causal_padding)
        if prev is not None and padding[4] > 0:
            x = torch.cat([prev.to(x.device), x], dim=2)
            padding[4] -= prev.shape[2]
        # pad after joining prev, so a strip's halo covers the previous chunk's frames as well
        return super().forward(F.pad(x, padding) if spatial is None else spatial.pad(x, padding))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        """With a cache: continue from the previous chunk and remember this chunk's tail."""
        if cache is None:
            return self.conv(x)
        prev = cache.get(self)
        cache.put(self, _carry(x, prev))
        return self.conv(x, prev, cache.spatial)


# ---------------------------------------------------------------------------------------------
# 2. RMS norm
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) and a per-channel gamma; no bias.

    gamma is (C, 1, 1, 1) for videos and (C, 1, 1) for per-frame images (the attention block).
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


# ---------------------------------------------------------------------------------------------
# 3. Blocks: residual, attention, resample
# ---------------------------------------------------------------------------------------------
def _frames_to_images(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W)."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _images_to_frames(x: torch.Tensor, t: int) -> torch.Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W)."""
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).permute(0, 2, 1, 3, 4)


class ResidualBlock(nn.Module):
    """[RMSNorm, SiLU, conv 3^3, RMSNorm, SiLU, Dropout, conv 3^3] + shortcut (1^3 conv when in != out)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, plus a residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        """x: (B, C, T, H, W); frames are independent, so the causal state is not used.

        Every position attends to the whole frame, so a strip of a split decode gathers the full
        frame, runs the block on it (as every other strip does; it is at latent resolution) and
        keeps its own rows: the same numbers as the unsplit block.
        """
        spatial = cache.spatial if cache is not None else None
        if spatial is not None:
            x = spatial.gather_rows(x)
        identity = x
        b, c, t, h, w = x.shape
        x = self.norm(_frames_to_images(x))
        # (B*T, 3C, H, W) -> three (B*T, 1, H*W, C)
        q, k, v = self.to_qkv(x).reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x)
        x = _images_to_frames(x, t) + identity
        return spatial.local_rows(x) if spatial is not None else x


class Upsample2x(nn.Module):
    """Nearest-exact x2 in H and W, computed in fp32 (the reference's bf16 workaround)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial x2 up/down sampling per frame, plus temporal x2 (`time_conv`) for the 3d modes.

    downsample2d/3d: ZeroPad2d(right 1, bottom 1) + Conv2d 3x3 stride 2 (C -> C);
    downsample3d adds time_conv (3,1,1) stride 2 over [last cached frame, chunk].
    upsample2d/3d: nearest-exact x2 (in fp32) + Conv2d 3x3 (C -> C/2);
    upsample3d first runs time_conv (3,1,1) C -> 2C and interleaves the halves in time (t -> 2t).
    The first chunk of a call skips time_conv in both directions, as Wan's causal schedule does.
    In a row-split decode the upsampling conv takes its H padding from the cache's `SpatialSplit`
    (nearest x2 and time_conv act per row, so they need nothing from the neighbours).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            x = self._upsample_time(x, cache)
        t = x.shape[2]
        spatial = cache.spatial if cache is not None else None
        if spatial is not None and spatial.splits_rows and self.mode.startswith("upsample"):
            x = _images_to_frames(self._upsample_space_split(_frames_to_images(x), spatial), t)
        else:
            x = _images_to_frames(self.resample(_frames_to_images(x)), t)
        if self.mode == "downsample3d" and cache is not None:
            x = self._downsample_time(x, cache)
        return x

    def _upsample_space_split(self, x: torch.Tensor, spatial: SpatialSplit) -> torch.Tensor:
        """`self.resample` on a strip (B*T, C, h, W): the conv's H padding comes from the neighbours.

        Only for a split decode: the unsplit path keeps nn.Conv2d's built-in zero padding (no copy).
        """
        upsample, conv = self.resample
        ph, pw = conv.padding
        x = spatial.pad(upsample(x), (pw, pw, ph, ph))
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    def _upsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """(B, C, t, H, W) -> (B, C, 2t, H, W); the first call of a decode leaves its one frame alone."""
        prev = cache.get(self.time_conv)
        if prev is None:
            cache.put(self.time_conv, _FIRST_FRAME_DONE)
            return x
        carry = x[:, :, -CACHE_T:].clone()
        if carry.shape[2] < CACHE_T:
            front = torch.zeros_like(carry) if prev is _FIRST_FRAME_DONE else prev[:, :, -1:]
            carry = torch.cat([front, carry], dim=2)
        # The second call pads with zeros; later calls continue from the cached frames.
        x = self.time_conv.conv(x, None if prev is _FIRST_FRAME_DONE else prev)
        cache.put(self.time_conv, carry)
        b, c2, t, h, w = x.shape
        x = x.reshape(b, 2, c2 // 2, t, h, w)
        x = torch.stack((x[:, 0], x[:, 1]), dim=3)  # first half -> even frames, second half -> odd frames
        return x.reshape(b, c2 // 2, t * 2, h, w)

    def _downsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """(B, C, t, H, W) -> (B, C, t', H, W); the first chunk only remembers its frame."""
        prev = cache.get(self.time_conv)
        if prev is None:
            cache.put(self.time_conv, x.clone())
            return x
        carry = x[:, :, -1:].clone()
        x = self.time_conv.conv(torch.cat([prev[:, :, -1:], x], dim=2))
        cache.put(self.time_conv, carry)
        return x


# ---------------------------------------------------------------------------------------------
# 4. Encoder and decoder
# ---------------------------------------------------------------------------------------------
def _run(blocks: nn.Sequential, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    for block in blocks:
        x = block(x, cache) if isinstance(block, (ResidualBlock, AttentionBlock, Resample, CausalConv3d)) else block(x)
    return x


class Encoder3d(nn.Module):
    """conv1 -> downsamples (res blocks per level, then a resample between levels) -> middle -> head.

    Release: 3 -> 96, levels 96/192/384/384 with 2d, 3d, 3d downsampling, head to 2*z_dim channels.
    """

    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temperal_downsample: tuple[bool, ...], dropout: float = 0.0) -> None:
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]

        # 1. input conv
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)

        # 2. downsampling levels
        downsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                downsamples.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*downsamples)

        # 3. middle
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, dropout), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim, dropout))

        # 4. head
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return _run(self.head, x, cache)


class Decoder3d(nn.Module):
    """conv1 -> middle -> upsamples (num_res_blocks + 1 res blocks per level, then a resample) -> head.

    Release: 16 -> 384, levels 384/384/192/96 with 3d, 3d, 2d upsampling (each halves the channels
    it outputs, so the next level starts from half its input width), head to 3 channels.
    """

    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temperal_upsample: tuple[bool, ...], dropout: float = 0.0) -> None:
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]

        # 1. input conv
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)

        # 2. middle
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))

        # 3. upsampling levels
        upsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim = in_dim // 2  # the previous level's resample halved the channels
            for _ in range(num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                upsamples.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*upsamples)

        # 4. head
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return _run(self.head, x, cache)


# ---------------------------------------------------------------------------------------------
# 5. The VAE
# ---------------------------------------------------------------------------------------------
class WanVAE(nn.Module):
    """Wan2.1 video VAE: (B, 3, 4n+1, H, W) pixels in [-1, 1] <-> normalised latents (B, z, n+1, H/8, W/8).

    Encoding runs in causal chunks of input frames [0:1], [1:5], [5:9], ... and decoding one latent frame
    at a time, both with a per-call `FeatureCache`; this is what makes temporal (de)compression happen
    (Wan's causal schedule). Latents are normalised per channel, (mu - mean) / std, as the Wan code does, so
    callers never see the raw posterior mean. Runs in the dtype of the weights (fp32 for parity) and
    returns fp32.
    """

    def __init__(self, config: WanVAEConfig = WanVAEConfig()) -> None:
        super().__init__()
        self._check_config(config)
        self.config = config
        z = config.z_dim
        temperal_upsample = tuple(reversed(config.temperal_downsample))
        self.encoder = Encoder3d(config.base_dim, z * 2, config.dim_mult, config.num_res_blocks,
                                 config.temperal_downsample)
        self.conv1 = CausalConv3d(z * 2, z * 2, 1)  # posterior (mu, logvar)
        self.conv2 = CausalConv3d(z, z, 1)  # before the decoder
        self.decoder = Decoder3d(config.base_dim, z, config.dim_mult, config.num_res_blocks, temperal_upsample)

    @staticmethod
    def _check_config(config: WanVAEConfig) -> None:
        if len(config.temperal_downsample) != len(config.dim_mult) - 1:
            raise ValueError(f"temperal_downsample ({list(config.temperal_downsample)}) needs one entry per "
                             f"downsampling, len(dim_mult) - 1 = {len(config.dim_mult) - 1}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(config, name)) != config.z_dim:
                raise ValueError(f"{name} has {len(getattr(config, name))} values but z_dim is {config.z_dim}; "
                                 f"give one value per latent channel")

    # ---- shapes ----
    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames for `num_frames` pixel frames (1 + (F - 1) / 4 for the release)."""
        return (num_frames - 1) // self.config.temporal_stride + 1

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """Pixel frames decoded from `num_latent_frames` (1 + 4 (T - 1) for the release)."""
        return 1 + self.config.temporal_stride * (num_latent_frames - 1)

    def _check_video(self, video: torch.Tensor) -> None:
        ts, ss = self.config.temporal_stride, self.config.spatial_stride
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if t < 1 or (t - 1) % ts:
            lower = (max(t, 1) - 1) // ts * ts + 1
            raise ValueError(f"num_frames ({t}) must be {ts}n+1 (1, {ts + 1}, {2 * ts + 1}, ...); "
                             f"use {lower} or {lower + ts}")
        for name, size in (("height", h), ("width", w)):
            if size < ss or size % ss:
                raise ValueError(f"{name} ({size}) must be a positive multiple of {ss}; "
                                 f"use {max(size // ss, 1) * ss} or {(size // ss + 1) * ss}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        z = self.config.z_dim
        if latents.ndim != 5 or latents.shape[1] != z:
            raise ValueError(f"latents must be (B, {z}, T, H, W), got shape {tuple(latents.shape)}")
        if min(latents.shape[2:]) < 1:
            raise ValueError(f"latents need at least one frame and one pixel, got shape {tuple(latents.shape)}")

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and 1/std, shaped (1, z, 1, 1, 1), in fp32 as in the Wan code."""
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        return mean, 1.0 / std

    # ---- encode ----
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T=4n+1, H, W) in [-1, 1] -> normalised posterior mean (B, z, n+1, H/8, W/8), fp32."""
        self._check_video(video)
        x = video.to(device=self.device, dtype=self.dtype)
        ts = self.config.temporal_stride
        cache = FeatureCache()
        chunks = [x[:, :, :1]] + [x[:, :, i:i + ts] for i in range(1, x.shape[2], ts)]
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu, _logvar = self.conv1(out).chunk(2, dim=1)
        mean, inv_std = self._mean_std(mu.device)
        return ((mu - mean) * inv_std).float()

    # ---- decode ----
    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor, spatial: SpatialSplit | None = None) -> Iterator[torch.Tensor]:
        """Normalised latents (B, z, T, h, w) -> pixel chunks in [-1, 1], fp32, one per latent frame.

        The first chunk is (B, 3, 1, 8h, 8w), every later one (B, 3, 4, 8h, 8w). Consume the whole
        generator: the causal state lives only for its lifetime. `spatial`: when `latents` is one
        row strip of a split decode, the split that connects it to the other strips (default: unsplit).
        """
        self._check_latents(latents)
        mean, inv_std = self._mean_std(latents.device)
        z = latents.float() / inv_std + mean
        x = self.conv2(z.to(device=self.device, dtype=self.dtype))
        cache = FeatureCache(spatial)
        for i in range(x.shape[2]):
            yield self.decode_step(x[:, :, i:i + 1], cache).float().clamp_(-1.0, 1.0)

    def decode_step(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """One latent frame after conv2, (B, z, 1, h, w) -> unclamped pixels (B, 3, 1 or 4, 8h, 8w).

        `cache` holds this call's causal state and its `SpatialSplit` (a strip of a split decode
        keeps its own cache).
        """
        return self.decoder(x, cache)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, spatial: SpatialSplit | None = None) -> torch.Tensor:
        """Normalised latents (B, z, T, h, w) -> video (B, 3, 4(T-1)+1, 8h, 8w) in [-1, 1], fp32.

        With `spatial`, `latents` is this rank's row strip and the result is its strip of pixel rows
        (`parallel.vae_decode.decode_patch_parallel` splits and reassembles).
        """
        return torch.cat(list(self.decode_frames(latents, spatial)), dim=2)

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "WanVAE":
        """Load an original `Wan2.1_VAE.pth` (file, or a folder holding one) or a diffusers `vae/` folder.

        The file may also be the same state dict as `.safetensors` (e.g. converted from an untrusted `.pth`,
        which is refused). The original file carries no config, so the shape is read off its tensors; the diffusers
        folder's `config.json` is read. Every missing, unexpected or mis-shaped key is an error.
        """
        path = Path(path)
        if path.is_dir() and (path / ORIGINAL_FILENAME).is_file():
            path = path / ORIGINAL_FILENAME
        if path.is_file():
            sd = load_weights_file(path)
            config = infer_config_from_original(sd, source=str(path))
            source = str(path)
        elif path.is_dir() and (path / "config.json").is_file():
            config = config_from_diffusers_json(json.loads((path / "config.json").read_text()),
                                                source=str(path / "config.json"))
            raw, source = load_safetensors_dir(path)
            sd = diffusers_to_original(raw, config)
        else:
            raise CheckpointError(f"no Wan VAE at {path}: expected a {ORIGINAL_FILENAME} file, a folder holding "
                                  f"one, or a diffusers vae/ folder with config.json (for a diffusers pipeline "
                                  f"folder, pass its vae/ subfolder)")
        logger.info("loading Wan VAE from %s (base_dim %d, z_dim %d)", source, config.base_dim, config.z_dim)
        with meta_device():
            model = cls(config)
        return load_strict(model, sd, source, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, layout: str = "original") -> None:
        """Write the weights: layout "original" -> a `.pth` state dict at `path` (e.g. .../Wan2.1_VAE.pth);
        layout "diffusers" -> folder `path` with `config.json` and `diffusion_pytorch_model.safetensors`."""
        path = Path(path)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if layout == "original":
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, path)
        elif layout == "diffusers":
            save_safetensors_sharded(original_to_diffusers(sd, self.config), path)
            (path / "config.json").write_text(json.dumps(config_to_diffusers_json(self.config), indent=2))
        else:
            raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
        logger.info("saved Wan VAE (%s layout) to %s", layout, path)


# ---------------------------------------------------------------------------------------------
# 6. Configs of checkpoints
# ---------------------------------------------------------------------------------------------
def infer_config_from_original(sd: StateDict, source: str = "<state dict>") -> WanVAEConfig:
    """Read base_dim, z_dim, dim_mult, num_res_blocks and temperal_downsample off original tensor shapes."""
    try:
        base_dim = int(sd["encoder.conv1.weight"].shape[0])
        z_dim = int(sd["conv2.weight"].shape[0])
        kinds: list[str] = []  # per encoder.downsamples entry: "res" or "2d" / "3d"
        widths: list[int] = []  # output width of each residual block
        while True:
            prefix = f"encoder.downsamples.{len(kinds)}."
            if prefix + "residual.6.weight" in sd:
                kinds.append("res")
                widths.append(int(sd[prefix + "residual.6.weight"].shape[0]))
            elif prefix + "resample.1.weight" in sd:
                kinds.append("3d" if prefix + "time_conv.weight" in sd else "2d")
            else:
                break
    except KeyError as exc:
        raise CheckpointError(f"{source} is not a Wan2.1 VAE state dict: missing key {exc}") from None
    resamples = [i for i, k in enumerate(kinds) if k != "res"]
    num_res_blocks = resamples[0] if resamples else len(kinds)
    if num_res_blocks == 0 or len(widths) % num_res_blocks:
        raise CheckpointError(f"{source}: cannot read the encoder layout from encoder.downsamples.* ({kinds})")
    dim_mult = tuple(widths[i] // base_dim for i in range(num_res_blocks - 1, len(widths), num_res_blocks))
    temperal_downsample = tuple(kinds[i] == "3d" for i in resamples)
    return WanVAEConfig(base_dim=base_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=num_res_blocks,
                        temperal_downsample=temperal_downsample)


def config_from_diffusers_json(cfg: dict[str, Any], source: str = "config.json") -> WanVAEConfig:
    """diffusers `AutoencoderKLWan` (or `AutoencoderKLQwenImage`) config.json -> WanVAEConfig; refuses variants the
    2.1 VAE does not have."""
    if cfg.get("_class_name") not in DIFFUSERS_CLASSES:
        raise CheckpointError(f"{source} describes {cfg.get('_class_name')!r}, not one of {DIFFUSERS_CLASSES}")
    unsupported = {
        "is_residual": (cfg.get("is_residual", False), False),  # True for the Wan2.2 VAE
        "patch_size": (cfg.get("patch_size"), None),
        "attn_scales": (list(cfg.get("attn_scales", [])), []),
        "decoder_base_dim": (cfg.get("decoder_base_dim"), None),
        "in_channels": (cfg.get("in_channels", cfg.get("input_channels", 3)), 3),  # Qwen-Image: input_channels
        "out_channels": (cfg.get("out_channels", 3), 3),
    }
    if cfg.get("decoder_base_dim") == cfg.get("base_dim", 96):
        unsupported.pop("decoder_base_dim")
    bad = [f"{k}={got!r} (need {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if bad:
        raise CheckpointError(f"{source}: only the Wan2.1 VAE is supported; unsupported settings: {', '.join(bad)}")
    defaults = WanVAEConfig()
    return WanVAEConfig(
        base_dim=int(cfg.get("base_dim", defaults.base_dim)),
        z_dim=int(cfg.get("z_dim", defaults.z_dim)),
        dim_mult=tuple(int(m) for m in cfg.get("dim_mult", defaults.dim_mult)),
        num_res_blocks=int(cfg.get("num_res_blocks", defaults.num_res_blocks)),
        temperal_downsample=tuple(bool(t) for t in cfg.get("temperal_downsample", defaults.temperal_downsample)),
        latents_mean=tuple(float(m) for m in cfg.get("latents_mean", defaults.latents_mean)),
        latents_std=tuple(float(s) for s in cfg.get("latents_std", defaults.latents_std)),
    )


def config_to_diffusers_json(config: WanVAEConfig) -> dict[str, Any]:
    """WanVAEConfig -> a config.json that diffusers `AutoencoderKLWan.from_pretrained` accepts."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        "base_dim": config.base_dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(config.temperal_downsample),
        "dropout": 0.0,
        "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
        "is_residual": False,
        "in_channels": 3,
        "out_channels": 3,
        "patch_size": None,
        "scale_factor_temporal": config.temporal_stride,
        "scale_factor_spatial": config.spatial_stride,
    }
