"""ServiceConfig: the decode pool's patch_parallel key (only the VAE pool has it, bounded, named in errors)."""

from __future__ import annotations

import pydantic
import pytest

from actors.config import PoolConfig, ServiceConfig, VAEConfig


def test_patch_parallel_is_a_vae_pool_key_with_default_1() -> None:
    assert ServiceConfig().vae.patch_parallel == 1
    cfg = ServiceConfig.load(overrides=["vae.patch_parallel=2", "vae.replicas=3"])
    assert isinstance(cfg.vae, VAEConfig) and (cfg.vae.patch_parallel, cfg.vae.replicas) == (2, 3)
    assert "patch_parallel" not in PoolConfig.model_fields  # the text-encoder pool's config


def test_patch_parallel_on_the_text_encoder_is_rejected() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        ServiceConfig.load(overrides=["text_encoder.patch_parallel=2"])
    (error,) = caught.value.errors()
    assert error["type"] == "extra_forbidden" and error["loc"] == ("text_encoder", "patch_parallel")


@pytest.mark.parametrize("value", [0, 65])
def test_patch_parallel_out_of_range_names_the_field(value: int) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        ServiceConfig.load(overrides=[f"vae.patch_parallel={value}"])
    (error,) = caught.value.errors()
    assert error["loc"] == ("vae", "patch_parallel")
    assert "vae.patch_parallel" in str(caught.value)
