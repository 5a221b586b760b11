"""FLUX.1 autoencoder ("ae"): a 2-D KL autoencoder with 16 latent channels and no quant convs.

Read top-down: ResNet block -> mid-block attention -> down/upsample -> encoder -> decoder ->
`FluxVAE` (normalised encode/decode, loading). The math is that of the original release's autoencoder,
which is also diffusers' `AutoencoderKL` with FLUX's config: GroupNorm (eps 1e-6) + SiLU + 3x3 conv
ResNets, one single-head self-attention over all pixels in each mid block, downsampling by an
asymmetric (0, 1, 0, 1) zero pad and a stride-2 3x3 conv, upsampling by nearest 2x and a 3x3 conv.

Parameter names equal the keys of the original `ae.safetensors`, so that file loads without a key
map; the diffusers `vae/` folder goes through `models.flux.vae_keys`. The attention projections are
kept as the original 1x1 kernels but applied as matrix products on (B, H*W, C) tokens, the operations
diffusers runs, in its order and memory layout, so on CPU in fp32 the results are bit-identical
(tests/models/flux/test_vae.py).

Latents are normalised as the DiT sees them: encode returns (mean - shift) * scale, decode undoes it.
Encode returns the posterior mean, not a sample, so the same image always gives the same latents.
The reference image-to-image pipelines draw mean + std * noise instead; a caller that wants that can
add the noise itself (the log-variance is the second half of `encoder(images)`).

Strip-parallel decode: `decode(latents, spatial=...)` runs on one horizontal strip of latent rows, and
`split` (a `RowSplit`, e.g. `parallel.flux_vae_decode.FluxRowSplit`) connects it to the other strips at
the three places where rows meet: every 3x3 conv takes its H padding from the neighbours' boundary rows,
every GroupNorm takes its statistics over the whole image (unlike Wan's per-pixel RMS norm, GroupNorm
averages over all of H x W), and the mid-block attention runs on the gathered full map and keeps its own
rows. Without a split (the default) the layers run exactly as in the single-device network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.flux.vae_config import FLUX1_VAE, FluxVAEConfig
from models.flux.vae_keys import diffusers_to_original, original_to_diffusers, strip_original_prefix
from models.loading import (
    CheckpointError,
    StateDict,
    load_safetensors_dir,
    load_strict,
    load_weights_file,
    meta_device,
    save_safetensors_sharded,
)

__all__ = ["DIFFUSERS_CLASS", "ORIGINAL_FILENAME", "FluxVAE", "RowSplit", "config_from_diffusers_json",
           "config_to_diffusers_json", "infer_config_from_original"]

logger = logging.getLogger(__name__)

ORIGINAL_FILENAME = "ae.safetensors"
DIFFUSERS_CLASS = "AutoencoderKL"
NORM_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# 1. The row-split seam and the building blocks
# ---------------------------------------------------------------------------------------------
class RowSplit(Protocol):
    """How a strip of a row-split decode reaches the other strips (x: (B, C, h, W), this strip's rows)."""

    def pad(self, x: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
        """F.pad(x, padding) with the H pad rows taken from the neighbouring strips (zeros at the edges)."""

    def group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """`norm(x)` with the group mean and variance of the whole image, not of this strip."""

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This strip -> the full map (all strips in order)."""

    def local_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The full map -> this strip's rows."""


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


def _norm(norm: nn.GroupNorm, x: torch.Tensor, split: RowSplit | None) -> torch.Tensor:
    return norm(x) if split is None else split.group_norm(norm, x)


def _conv(conv: nn.Conv2d, x: torch.Tensor, split: RowSplit | None) -> torch.Tensor:
    """A 'same' 3x3 conv; in a split decode its padding comes through the split (the halo rows)."""
    if split is None:
        return conv(x)
    return F.conv2d(split.pad(x, (1, 1, 1, 1)), conv.weight, conv.bias)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """The 'same' 3x3 conv every level uses (zero padding 1)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        h = _conv(self.conv1, F.silu(_norm(self.norm1, x, split)), split)
        h = _conv(self.conv2, F.silu(_norm(self.norm2, h, split)), split)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W pixels, scale 1/sqrt(C), with a residual.

    q, k, v and proj_out are stored as 1x1 conv kernels (C, C, 1, 1) like the original file, and
    applied as `F.linear` on (B, H*W, C) tokens like diffusers (same numbers, same kernels).
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    @staticmethod
    def _linear(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        """Every pixel attends to the whole map: a strip of a split decode gathers the full (latent-size)
        map, attends on it and keeps its own rows, which gives the unsplit numbers."""
        if split is not None:
            return split.local_rows(self.forward(split.gather_rows(x)))
        b, c, h, w = x.shape
        tokens = self.norm(x.view(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (self._linear(p, tokens).unsqueeze(1) for p in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self._linear(self.proj_out, out)
        # Attention first: the sum then keeps the output's (channels-last) strides, as in diffusers, so the
        # next conv picks the same kernel and rounds identically.
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    """Halve H and W: zero-pad one row/column at the bottom/right, then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        return _conv(self.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"), split)


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = MidAttention(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, split), split), split)


class Level(nn.Module):
    """One resolution level: `block` ResNets and an optional `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, widths: list[tuple[int, int]], groups: int, resample: str | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in widths)
        if resample == "down":
            self.downsample = Downsample(widths[-1][1])
        elif resample == "up":
            self.upsample = Upsample(widths[-1][1])


# ---------------------------------------------------------------------------------------------
# 2. Encoder and decoder
# ---------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """(B, in, H, W) -> (B, 2 * latent, H / s, W / s): the mean and log-variance of the posterior."""

    def __init__(self, config: FluxVAEConfig) -> None:
        super().__init__()
        widths, groups, n = config.block_out_channels, config.norm_num_groups, config.layers_per_block
        self.conv_in = _conv3x3(config.in_channels, widths[0])
        self.down = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            pairs = [(prev if j == 0 else width, width) for j in range(n)]
            self.down.append(Level(pairs, groups, "down" if i < len(widths) - 1 else None))
            prev = width
        self.mid = MidBlock(widths[-1], groups)
        self.norm_out = _group_norm(widths[-1], groups)
        self.conv_out = _conv3x3(widths[-1], 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, latent, h, w) -> (B, out, h * s, w * s). `up[i]` is level i of the encoder, run in reverse."""

    def __init__(self, config: FluxVAEConfig) -> None:
        super().__init__()
        widths, groups, n = config.block_out_channels, config.norm_num_groups, config.layers_per_block
        self.conv_in = _conv3x3(config.latent_channels, widths[-1])
        self.mid = MidBlock(widths[-1], groups)
        levels: list[Level] = []
        prev = widths[-1]
        for i in reversed(range(len(widths))):  # decode order: lowest resolution first
            width = widths[i]
            pairs = [(prev if j == 0 else width, width) for j in range(n + 1)]
            levels.insert(0, Level(pairs, groups, "up" if i > 0 else None))
            prev = width
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(widths[0], groups)
        self.conv_out = _conv3x3(widths[0], config.out_channels)

    def forward(self, z: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        """`split`: when z is one row strip of a split decode, how it reaches the other strips."""
        h = self.mid(_conv(self.conv_in, z, split), split)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, split)
            if hasattr(level, "upsample"):
                h = level.upsample(h, split)
        return _conv(self.conv_out, F.silu(_norm(self.norm_out, h, split)), split)


# ---------------------------------------------------------------------------------------------
# 3. The autoencoder
# ---------------------------------------------------------------------------------------------
class FluxVAE(nn.Module):
    """FLUX.1 autoencoder: images in [-1, 1] <-> normalised latents (B, 16, H/8, W/8) for the DiT."""

    image_wide_norms = True
    """Its decoder's GroupNorms average over the whole image: a strip-parallel decode must share their sums."""

    def __init__(self, config: FluxVAEConfig = FLUX1_VAE) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.spatial_stride
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % s or images.shape[-1] % s:
            raise ValueError(f"image height and width must be multiples of {s}, got "
                             f"{images.shape[-2]}x{images.shape[-1]}; crop or resize to a multiple of {s}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must be (B, {self.config.latent_channels}, h, w), got {tuple(latents.shape)}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> normalised posterior mean (B, 16, H/8, W/8)."""
        self._check_images(images)
        moments = self.encoder(images.to(self.dtype))
        mean = moments[:, : self.config.latent_channels]
        return (mean - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latents: torch.Tensor, spatial: RowSplit | None = None) -> torch.Tensor:
        """Normalised latents (B, 16, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped).

        With `spatial` (the same seam name as the Wan VAE's), `latents` is this rank's strip of latent rows
        and the result its strip of pixel rows.
        """
        self._check_latents(latents)
        z = latents.to(self.dtype) / self.config.scaling_factor + self.config.shift_factor
        return self.decoder(z, spatial)

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "FluxVAE":
        """Load the original `ae.safetensors` (the file, or a folder holding it), a diffusers `vae/` folder
        (config.json + safetensors), or a diffusers release folder with a `vae/` subfolder.

        The original file carries no config: widths and depths are read off its tensors, GroupNorm uses 32
        groups and the latent scale/shift are FLUX.1's. Every missing, unexpected or mis-shaped key is an error.
        """
        path = Path(path)
        if path.is_dir() and (path / ORIGINAL_FILENAME).is_file():
            path = path / ORIGINAL_FILENAME
        elif path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if path.is_file():
            sd = strip_original_prefix(load_weights_file(path))
            config = infer_config_from_original(sd, source=str(path))
            source = str(path)
        elif path.is_dir() and (path / "config.json").is_file():
            config = config_from_diffusers_json(json.loads((path / "config.json").read_text()),
                                                source=str(path / "config.json"))
            raw, source = load_safetensors_dir(path)
            sd = diffusers_to_original(raw, config)
        else:
            raise CheckpointError(f"no FLUX VAE at {path}: expected an {ORIGINAL_FILENAME} file, a folder holding "
                                  f"one, a diffusers vae/ folder with config.json, or a release folder with vae/")
        logger.info("loading FLUX VAE from %s (widths %s, %d latent channels)", source,
                    config.block_out_channels, config.latent_channels)
        with meta_device():
            model = cls(config)
        return load_strict(model, sd, source, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, layout: str = "original") -> None:
        """layout "original" -> `path` is the `ae.safetensors` file; "diffusers" -> folder with config.json +
        `diffusion_pytorch_model.safetensors`."""
        from safetensors.torch import save_file

        path = Path(path)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if layout == "original":
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(sd, str(path))
        elif layout == "diffusers":
            save_safetensors_sharded(original_to_diffusers(sd, self.config), path)
            (path / "config.json").write_text(json.dumps(config_to_diffusers_json(self.config), indent=2))
        else:
            raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")


# ---------------------------------------------------------------------------------------------
# 4. Configs of checkpoints
# ---------------------------------------------------------------------------------------------
def infer_config_from_original(sd: StateDict, source: str = "<state dict>") -> FluxVAEConfig:
    """Read the level widths, depth, channels and latent width off an original-layout state dict."""
    try:
        widths: list[int] = []
        while f"encoder.down.{len(widths)}.block.0.conv1.weight" in sd:
            widths.append(int(sd[f"encoder.down.{len(widths)}.block.0.conv1.weight"].shape[0]))
        layers = 0
        while f"encoder.down.0.block.{layers}.conv1.weight" in sd:
            layers += 1
        config = FluxVAEConfig(
            in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
            out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
            block_out_channels=tuple(widths),
            layers_per_block=layers,
            latent_channels=int(sd["decoder.conv_in.weight"].shape[1]),
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{source} is not a FLUX autoencoder state dict ({exc}); expected original keys "
                              f"such as encoder.down.0.block.0.conv1.weight and decoder.conv_in.weight") from None
    return config


def config_from_diffusers_json(cfg: dict[str, Any], source: str = "config.json") -> FluxVAEConfig:
    """diffusers `AutoencoderKL` config.json -> FluxVAEConfig; refuses settings this network does not have."""
    if cfg.get("_class_name") != DIFFUSERS_CLASS:
        raise CheckpointError(f"{source} describes {cfg.get('_class_name')!r}, not {DIFFUSERS_CLASS!r}")
    levels = len(cfg.get("block_out_channels", FLUX1_VAE.block_out_channels))
    unsupported = {
        "use_quant_conv": (cfg.get("use_quant_conv", True), False),
        "use_post_quant_conv": (cfg.get("use_post_quant_conv", True), False),
        "mid_block_add_attention": (cfg.get("mid_block_add_attention", True), True),
        "act_fn": (cfg.get("act_fn", "silu"), "silu"),
        "down_block_types": (list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * levels)),
                             ["DownEncoderBlock2D"] * levels),
        "up_block_types": (list(cfg.get("up_block_types", ["UpDecoderBlock2D"] * levels)),
                           ["UpDecoderBlock2D"] * levels),
    }
    bad = [f"{k}={got!r} (need {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if bad:
        raise CheckpointError(f"{source}: not a FLUX.1-style autoencoder; unsupported settings: {', '.join(bad)}")
    try:
        return FluxVAEConfig(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
            layers_per_block=int(cfg.get("layers_per_block", 1)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            scaling_factor=float(cfg["scaling_factor"]),
            shift_factor=float(cfg.get("shift_factor") or 0.0),
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{source}: bad or missing autoencoder setting ({exc})") from None


def config_to_diffusers_json(config: FluxVAEConfig) -> dict[str, Any]:
    """FluxVAEConfig -> a config.json that diffusers `AutoencoderKL.from_pretrained` accepts."""
    levels = len(config.block_out_channels)
    return {
        "_class_name": DIFFUSERS_CLASS,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": 1024,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }
