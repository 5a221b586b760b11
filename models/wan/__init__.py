"""Wan2.1 / Wan2.2: DiT, VAE, umT5 text encoder, presets and checkpoint loaders.

The public API:

    from models.wan import WanTransformer, WanVAE, WanTextEncoder   # the networks (torch)
    from models.wan import WanCheckpoint, get_preset, PRESETS         # description only (no torch)

The three networks are imported on first use (PEP 562 module `__getattr__`), so `import models.wan`
for the presets or the checkpoint layout loads neither torch nor transformers: the engine and the
HTTP ingress rely on that (tests/test_layering.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.lazy_exports import lazy_exports
from models.wan.checkpoint import WanCheckpoint, read_dit_config
from models.wan.config import (
    PRESETS,
    SamplingDefaults,
    WanDiTConfig,
    WanPreset,
    WanVAEConfig,
    get_preset,
    match_preset,
)

if TYPE_CHECKING:
    from models.wan.text_encoder import WanTextEncoder
    from models.wan.transformer import WanTransformer
    from models.wan.vae import WanVAE

# Public name -> the module that defines it; imported when the name is first read.
_LAZY = {
    "WanTransformer": "models.wan.transformer",
    "WanVAE": "models.wan.vae",
    "WanTextEncoder": "models.wan.text_encoder",
}

__all__ = [
    "PRESETS",
    "SamplingDefaults",
    "WanCheckpoint",
    "WanDiTConfig",
    "WanPreset",
    "WanTextEncoder",
    "WanTransformer",
    "WanVAE",
    "WanVAEConfig",
    "get_preset",
    "match_preset",
    "read_dit_config",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
