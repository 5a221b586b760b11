"""QwenImageVAE (the Wan2.1 VAE on one frame) vs diffusers' `AutoencoderKLQwenImage`, and its strip-parallel decode.

The claim under test: Qwen-Image's VAE is the Wan2.1 VAE architecture. diffusers' AutoencoderKLQwenImage with
every parameter random is saved as a diffusers vae/ folder (as the release is) and loaded strictly into ours;
decode and encode (latents normalised with the config's mean/std on our side, as the pipeline does around
diffusers' VAE) agree, and the state-dict keys and shapes equal AutoencoderKLWan's. The strip-parallel decode is
tested in tests/parallel/test_context_parallel_qwen_image.py (one spawn of ranks for both).

Tolerances: fp32, same operations; measured max |diff| 0 for decode and 1.2e-7 for encode (latents up to 1.6);
asserted 1e-5 (pixels in [-1, 1], latents O(1)).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.loading import CheckpointError, meta_device
from models.qwen_image.tiny import tiny_vae_config
from models.qwen_image.vae import QwenImageVAE
from models.random_init import randomize_parameters
from models.wan.config import WanVAEConfig
from models.wan.vae import config_from_diffusers_json
from stages.decode import DecodeStage

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5
CONFIG = tiny_vae_config(16)  # the release's 16 latent channels and their mean / std, 16 wide
LATENT = (1, 16, 7, 6)  # (B, z, H', W'): 56 x 48 pixels


def _diffusers_kwargs(config: WanVAEConfig) -> dict[str, Any]:
    return dict(base_dim=config.base_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
                num_res_blocks=config.num_res_blocks, temperal_downsample=list(config.temperal_downsample),
                latents_mean=list(config.latents_mean), latents_std=list(config.latents_std))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, QwenImageVAE, Path]:
    folder = tmp_path_factory.mktemp("qwen_vae") / "vae"
    ref = randomize_parameters(diffusers.AutoencoderKLQwenImage(**_diffusers_kwargs(CONFIG)), seed=0).eval()
    ref.save_pretrained(folder)
    return ref, QwenImageVAE.from_pretrained(folder), folder


def _normalisation(config: WanVAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
    return mean, std


@torch.no_grad()
def test_decode_matches_autoencoder_kl_qwen_image(pair) -> None:
    ref, ours, _ = pair
    z = torch.randn(LATENT, generator=torch.Generator().manual_seed(1))
    mean, std = _normalisation(CONFIG)
    # The pipeline's de-normalisation, z / (1 / std) + mean, then decode of one frame.
    want = ref.decode((z / (1.0 / std) + mean)[:, :, None], return_dict=False)[0][:, :, 0]
    got = ours.decode(z)
    assert got.shape == (1, 3, 56, 48)
    assert (got.abs() < 1).float().mean() > 0.5, "most pixels should be unclamped, or the check is vacuous"
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@torch.no_grad()
def test_encode_matches_autoencoder_kl_qwen_image(pair) -> None:
    ref, ours, _ = pair
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, std = _normalisation(CONFIG)
    want = (ref.encode(image[:, :, None]).latent_dist.mean[:, :, 0] - mean) / std
    got = ours.encode(image)
    assert got.shape == (1, 16, 6, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_keys_and_shapes_are_autoencoder_kl_wan_s() -> None:
    """Same network as diffusers' Wan VAE: equal state dicts (names and shapes), default and tiny configs."""
    for config in (WanVAEConfig(), CONFIG):
        with meta_device():
            qwen = diffusers.AutoencoderKLQwenImage(**_diffusers_kwargs(config)).state_dict()
            wan = diffusers.AutoencoderKLWan(**_diffusers_kwargs(config)).state_dict()
        assert {k: tuple(v.shape) for k, v in qwen.items()} == {k: tuple(v.shape) for k, v in wan.items()}
        if config == WanVAEConfig():
            assert len(qwen) == 194 and sum(v.numel() for v in qwen.values()) == 126_892_531


def test_our_folder_loads_in_diffusers_strictly(pair, tmp_path: Path) -> None:
    ref, ours, _ = pair
    ours.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLQwenImage" and config["input_channels"] == 3
    loaded, info = diffusers.AutoencoderKLQwenImage.from_pretrained(tmp_path / "vae", output_loading_info=True)
    assert not any(info.values()), info
    sd = ref.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())


def test_the_wan_config_reader_takes_qwen_image_configs(pair) -> None:
    _, _, folder = pair
    config = json.loads((folder / "config.json").read_text())
    assert config_from_diffusers_json(config) == CONFIG
    with pytest.raises(CheckpointError, match=r"input_channels|in_channels=4"):
        config_from_diffusers_json({**config, "input_channels": 4})


def test_image_shapes_are_checked(pair, tmp_path: Path) -> None:
    _, ours, _ = pair
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\) \(one image, no frame axis\)"):
        ours.decode(torch.zeros(1, 16, 1, 4, 4))
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\)"):
        ours.encode(torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(CheckpointError, match="no Qwen-Image VAE"):
        QwenImageVAE.from_pretrained(tmp_path)
    frames = DecodeStage(ours).run(torch.zeros(16, 2, 3))  # what the decode stage gets: (C, H', W')
    assert frames.shape == (1, 16, 24, 3) and frames.dtype == np.uint8
