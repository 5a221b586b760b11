"""FLUX.2 (klein 4B / 9B): DiT, VAE, Qwen3 text encoder, presets and checkpoint resolution.

The public API:

    from models.flux2 import Flux2Transformer, Flux2VAE, Flux2TextEncoder        # the networks (torch)
    from models.flux2 import Flux2DiTConfig, get_preset, PRESETS, resolve_dit    # description only (no torch)

The networks are imported on first use (PEP 562 module `__getattr__`), so `import models.flux2` for the presets
or the checkpoint layout loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.flux2.checkpoint import Flux2DiTSource, infer_original_config, read_diffusers_config, resolve_dit
from models.flux2.config import (
    FLUX2_LATENT,
    PRESETS,
    Flux2DiTConfig,
    Flux2Preset,
    get_preset,
    match_preset,
)
from models.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from models.flux2.text_encoder import Flux2TextEncoder
    from models.flux2.transformer import Flux2Transformer
    from models.flux2.vae import Flux2VAE

# Public name -> the module that defines it; imported when the name is first read.
_LAZY = {
    "Flux2Transformer": "models.flux2.transformer",
    "Flux2VAE": "models.flux2.vae",
    "Flux2TextEncoder": "models.flux2.text_encoder",
}

__all__ = [
    "FLUX2_LATENT",
    "PRESETS",
    "Flux2DiTConfig",
    "Flux2DiTSource",
    "Flux2Preset",
    "Flux2TextEncoder",
    "Flux2Transformer",
    "Flux2VAE",
    "get_preset",
    "infer_original_config",
    "match_preset",
    "read_diffusers_config",
    "resolve_dit",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
