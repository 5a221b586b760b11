"""The public API of `models.wan`: the networks by name (imported on first use), presets and checkpoints.

That `import models.wan` alone loads neither torch nor transformers is checked in a fresh interpreter
by tests/test_layering.py.
"""

from __future__ import annotations

import pytest

import models.wan
from models.wan import PRESETS, WanCheckpoint, WanTextEncoder, WanTransformer, WanVAE, get_preset
from models.wan.checkpoint import WanCheckpoint as CheckpointClass
from models.wan.text_encoder import WanTextEncoder as TextEncoderClass
from models.wan.transformer import WanTransformer as TransformerClass
from models.wan.vae import WanVAE as VAEClass


def test_networks_are_the_classes_of_their_modules() -> None:
    assert WanTransformer is TransformerClass
    assert WanVAE is VAEClass
    assert WanTextEncoder is TextEncoderClass
    assert WanCheckpoint is CheckpointClass


def test_every_public_name_resolves_and_is_listed() -> None:
    for name in models.wan.__all__:
        assert getattr(models.wan, name) is not None
        assert name in dir(models.wan)
    assert get_preset("wan-tiny-shapes") is PRESETS["wan-tiny-shapes"]


def test_unknown_name_lists_the_public_ones() -> None:
    with pytest.raises(AttributeError, match=r"no attribute 'WanModel'.*WanTransformer"):
        models.wan.WanModel  # noqa: B018  # the attribute access is the test
