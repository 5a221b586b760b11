"""Wan2.1 VAE: parity with diffusers `AutoencoderKLWan`, shapes, key maps and checkpoint loading.

All on CPU in fp32 with a tiny base_dim and every parameter randomised (gammas ~ 1 + 0.1 randn,
all biases), so no part of the network can hide behind an identity or a zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from models.loading import CheckpointError
from models.wan.config import WanVAEConfig
from models.wan.vae import WanVAE, config_to_diffusers_json, infer_config_from_original
from models.wan.vae_keys import diffusers_to_original, original_to_diffusers

diffusers = pytest.importorskip("diffusers")
AutoencoderKLWan = diffusers.AutoencoderKLWan

TINY = WanVAEConfig(base_dim=8)
# Measured (torch 2.13 CPU, diffusers 0.42.1, seed 0): encode 1.2e-7 (|z| <= 1.3), decode 2.9e-6.
ENCODE_ATOL = 1e-5
DECODE_ATOL = 5e-5


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random: gammas around 1, weights ~ 1/sqrt(fan_in), biases ~ 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise)


def _tiny_vae(config: WanVAEConfig = TINY, seed: int = 0) -> WanVAE:
    vae = WanVAE(config).eval()
    _randomise(vae, seed)
    return vae


def _mean_std(config: WanVAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1),
            torch.tensor(config.latents_std).view(1, -1, 1, 1, 1))


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return _tiny_vae()


@pytest.fixture(scope="module")
def reference(vae: WanVAE) -> torch.nn.Module:
    ref = AutoencoderKLWan(base_dim=TINY.base_dim, z_dim=TINY.z_dim, dim_mult=list(TINY.dim_mult),
                           num_res_blocks=TINY.num_res_blocks,
                           temperal_downsample=list(TINY.temperal_downsample)).eval()
    ref.load_state_dict(original_to_diffusers(vae.state_dict(), TINY), strict=True)
    return ref


# ---- parity with diffusers ----
def test_encode_matches_diffusers(vae: WanVAE, reference: torch.nn.Module) -> None:
    video = torch.rand(2, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(video)
    with torch.no_grad():
        mu = reference.encode(video).latent_dist.mean
    mean, std = _mean_std(TINY)
    expected = (mu - mean) / std  # diffusers works on un-normalised latents
    assert z.shape == (2, 16, 3, 4, 6) and z.dtype == torch.float32
    assert not torch.allclose(z[0], z[1])
    torch.testing.assert_close(z, expected, atol=ENCODE_ATOL, rtol=0)


def test_decode_matches_diffusers(vae: WanVAE, reference: torch.nn.Module) -> None:
    z = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    video = vae.decode(z)
    mean, std = _mean_std(TINY)
    with torch.no_grad():
        expected = reference.decode(z * std + mean).sample
    assert video.shape == (2, 3, 9, 32, 48) and video.dtype == torch.float32
    assert video.abs().max() <= 1.0
    assert (video.abs() < 1).float().mean() > 0.5, "most pixels should be unclamped, or the check is vacuous"
    torch.testing.assert_close(video, expected, atol=DECODE_ATOL, rtol=0)


def test_decode_frames_yields_first_frame_then_fours(vae: WanVAE) -> None:
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(3))
    chunks = list(vae.decode_frames(z))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=2), vae.decode(z))


# ---- shapes and input checks ----
@pytest.mark.parametrize("num_frames, latent_frames", [(1, 1), (5, 2), (9, 3)])
def test_frame_counts(vae: WanVAE, num_frames: int, latent_frames: int) -> None:
    video = torch.rand(1, 3, num_frames, 16, 24) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 16, latent_frames, 2, 3)
    assert vae.num_latent_frames(num_frames) == latent_frames
    assert vae.num_pixel_frames(latent_frames) == num_frames
    assert vae.decode(z).shape == (1, 3, num_frames, 16, 24)


@pytest.mark.parametrize("shape, match", [
    ((1, 3, 8, 16, 16), r"num_frames \(8\) must be 4n\+1.*use 5 or 9"),
    ((1, 3, 0, 16, 16), r"num_frames \(0\) must be 4n\+1"),
    ((1, 3, 5, 20, 16), r"height \(20\) must be a positive multiple of 8.*use 16 or 24"),
    ((1, 3, 5, 16, 4), r"width \(4\) must be a positive multiple of 8"),
    ((1, 4, 5, 16, 16), r"video must be \(B, 3, T, H, W\)"),
    ((3, 5, 16, 16), r"video must be \(B, 3, T, H, W\)"),
])
def test_encode_rejects_bad_video(vae: WanVAE, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        vae.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 8, 2, 2, 2), (16, 2, 2, 2), (1, 16, 0, 2, 2)])
def test_decode_rejects_bad_latents(vae: WanVAE, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(shape))


def test_config_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"temperal_downsample"):
        WanVAE(WanVAEConfig(base_dim=8, temperal_downsample=(True, True)))
    with pytest.raises(ValueError, match=r"latents_mean has 16 values but z_dim is 4"):
        WanVAE(WanVAEConfig(base_dim=8, z_dim=4))


# ---- key maps ----
@pytest.mark.parametrize("config", [
    WanVAEConfig(),  # release
    WanVAEConfig(base_dim=8, num_res_blocks=1),
    WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2), num_res_blocks=3, temperal_downsample=(True, False)),
], ids=["release", "nrb1", "3levels-nrb3"])
def test_key_map_matches_diffusers(config: WanVAEConfig) -> None:
    with torch.device("meta"):
        ours = WanVAE(config).state_dict()
        theirs = AutoencoderKLWan(base_dim=config.base_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
                                  num_res_blocks=config.num_res_blocks,
                                  temperal_downsample=list(config.temperal_downsample)).state_dict()
    mapped = original_to_diffusers(ours, config)
    assert set(mapped) == set(theirs)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert diffusers_to_original(theirs, config).keys() == ours.keys()


def test_release_key_and_parameter_count() -> None:
    with torch.device("meta"):
        vae = WanVAE(WanVAEConfig())
    sd = vae.state_dict()
    assert len(sd) == 194
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert {"encoder.conv1.weight", "encoder.downsamples.5.time_conv.weight", "encoder.middle.1.to_qkv.weight",
            "encoder.head.2.weight", "conv1.weight", "conv2.weight", "decoder.conv1.weight",
            "decoder.upsamples.3.resample.1.weight", "decoder.upsamples.11.resample.1.weight",
            "decoder.head.0.gamma"} <= set(sd)
    assert "decoder.upsamples.11.time_conv.weight" not in sd  # the last upsample is 2d
    assert tuple(sd["decoder.upsamples.3.time_conv.weight"].shape) == (768, 384, 3, 1, 1)


def test_unknown_keys_pass_through() -> None:
    sd = {"encoder.conv1.weight": 1, "something.else": 2}
    assert original_to_diffusers(sd, TINY) == {"encoder.conv_in.weight": 1, "something.else": 2}
    assert diffusers_to_original({"something.else": 2}, TINY) == {"something.else": 2}


# ---- checkpoints ----
def test_infer_config_from_original_shapes() -> None:
    config = WanVAEConfig(base_dim=4, dim_mult=(1, 2, 3), num_res_blocks=1, temperal_downsample=(True, False))
    with torch.device("meta"):
        sd = WanVAE(config).state_dict()
    assert infer_config_from_original(sd) == config
    with torch.device("meta"):
        release = WanVAE().state_dict()
    assert infer_config_from_original(release) == WanVAEConfig()


def test_both_layouts_load_and_decode_identically(vae: WanVAE, tmp_path: Path) -> None:
    pth = tmp_path / "ckpt" / "Wan2.1_VAE.pth"
    vae.save_pretrained(pth, layout="original")
    vae.save_pretrained(tmp_path / "vae", layout="diffusers")
    assert json.loads((tmp_path / "vae" / "config.json").read_text()) == config_to_diffusers_json(TINY)

    from_file = WanVAE.from_pretrained(pth)
    from_folder = WanVAE.from_pretrained(pth.parent)
    from_diffusers = WanVAE.from_pretrained(tmp_path / "vae")
    for loaded in (from_file, from_folder, from_diffusers):
        assert loaded.config == TINY
        assert not any(t.is_meta for t in loaded.state_dict().values())

    z = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(4))
    expected = vae.decode(z)
    for loaded in (from_file, from_folder, from_diffusers):
        assert torch.equal(loaded.decode(z), expected)

    # diffusers itself accepts the folder we wrote.
    theirs = AutoencoderKLWan.from_pretrained(tmp_path / "vae").eval()
    mean, std = _mean_std(TINY)
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z * std + mean).sample, expected, atol=DECODE_ATOL, rtol=0)


def _edited_pth(vae: WanVAE, tmp_path: Path, edit: Callable[[dict], object]) -> Path:
    sd = dict(vae.state_dict())
    edit(sd)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("decoder.upsamples.4.shortcut.bias"), r"missing keys: decoder\.upsamples\.4\.shortcut\.bias"),
    (lambda sd: sd.update({"decoder.extra.weight": torch.zeros(1)}), r"unexpected keys: decoder\.extra\.weight"),
    (lambda sd: sd.update({"decoder.middle.1.norm.gamma": torch.ones(32, 1, 1, 1)}),
     r"shape mismatches: decoder\.middle\.1\.norm\.gamma"),
])
def test_bad_original_checkpoint_names_key_and_file(vae: WanVAE, tmp_path: Path, edit: Callable[[dict], object],
                                                    match: str) -> None:
    path = _edited_pth(vae, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        WanVAE.from_pretrained(path)
    assert str(path) in str(info.value)


def test_bad_diffusers_checkpoint_names_key_and_file(vae: WanVAE, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    vae.save_pretrained(tmp_path / "vae", layout="diffusers")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd.pop("decoder.up_blocks.1.upsamplers.0.time_conv.weight")
    save_file(sd, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.upsamples\.7\.time_conv\.weight") as info:
        WanVAE.from_pretrained(tmp_path / "vae")
    assert str(weights) in str(info.value)


def test_diffusers_wan22_vae_is_refused(vae: WanVAE, tmp_path: Path) -> None:
    vae.save_pretrained(tmp_path / "vae", layout="diffusers")
    cfg_path = tmp_path / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(is_residual=True, patch_size=2)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"is_residual=True.*patch_size=2"):
        WanVAE.from_pretrained(tmp_path / "vae")


class _Payload:
    """A pickled object that weights_only loading must refuse."""


def test_pth_with_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        WanVAE.from_pretrained(path)


def test_missing_checkpoint_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth.*vae/"):
        WanVAE.from_pretrained(tmp_path)


def test_save_rejects_unknown_layout(vae: WanVAE, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout must be"):
        vae.save_pretrained(tmp_path / "x", layout="gguf")
