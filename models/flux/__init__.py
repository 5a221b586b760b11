"""FLUX.1-dev / FLUX.1-schnell: DiT, VAE, CLIP-L + T5-XXL text encoders, presets and checkpoint resolution.

The public API:

    from models.flux import FluxTransformer, FluxVAE, FluxTextEncoder     # the networks (torch)
    from models.flux import FluxDiTConfig, get_preset, PRESETS, resolve_dit   # description only (no torch)

The network is imported on first use (PEP 562 module `__getattr__`), so `import models.flux` for the presets
or the checkpoint layout loads no torch (tests/test_layering.py checks the same for models.wan).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.flux.checkpoint import FluxDiTSource, infer_original_config, read_diffusers_config, resolve_dit
from models.flux.config import (
    PRESETS,
    FluxDiTConfig,
    FluxPreset,
    get_preset,
    match_preset,
)
from models.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from models.flux.text_encoder import FluxTextEncoder
    from models.flux.transformer import FluxTransformer
    from models.flux.vae import FluxVAE

# Public name -> the module that defines it; imported when the name is first read.
_LAZY = {
    "FluxTransformer": "models.flux.transformer",
    "FluxVAE": "models.flux.vae",
    "FluxTextEncoder": "models.flux.text_encoder",
}

__all__ = [
    "PRESETS",
    "FluxDiTConfig",
    "FluxDiTSource",
    "FluxPreset",
    "FluxTextEncoder",
    "FluxTransformer",
    "FluxVAE",
    "get_preset",
    "infer_original_config",
    "match_preset",
    "read_diffusers_config",
    "resolve_dit",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
