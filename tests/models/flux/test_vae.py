"""FLUX.1 autoencoder: parity with diffusers `AutoencoderKL` (FLUX config), key maps and both checkpoint layouts.

CPU, fp32, tiny widths (32, 64) with GroupNorm's 32 groups, 2 ResNets per level, 16 latent channels,
and every parameter randomised (norm weights ~ 1 + 0.1 randn, all biases), so no layer hides behind
an identity or a zero. The original-layout keys come from diffusers' own single-file converter run
backwards against our map, not from our map alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.flux.vae import FluxVAE, config_to_diffusers_json, infer_config_from_original
from models.flux.vae_config import FLUX1_VAE, FluxVAEConfig
from models.flux.vae_keys import diffusers_to_original, original_to_diffusers
from models.loading import CheckpointError, meta_device
from models.random_init import randomize_parameters

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TINY = FluxVAEConfig(block_out_channels=(32, 64), layers_per_block=2, latent_channels=16)
# Same operations in the same order and memory layout: measured max |diff| = 0 for encode and decode.
# The tolerance only allows for a CPU whose conv/SDPA kernels round differently for either layout.
ATOL = 1e-5


def _reference(config: FluxVAEConfig, seed: int = 0) -> "diffusers.AutoencoderKL":
    cfg = {k: v for k, v in config_to_diffusers_json(config).items() if not k.startswith("_")}
    model = diffusers.AutoencoderKL(**cfg).eval()
    return randomize_parameters(model, seed=seed)


@pytest.fixture(scope="module")
def reference() -> "diffusers.AutoencoderKL":
    return _reference(TINY)


@pytest.fixture(scope="module")
def ours(reference) -> FluxVAE:
    sd = diffusers_to_original(reference.state_dict(), TINY)
    model = FluxVAE(TINY)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 24, 16, generator=g) * 2 - 1  # non-square, batch 2


@torch.no_grad()
def test_encode_decode_match_diffusers(reference, ours, images) -> None:
    mean = reference.encode(images).latent_dist.mean
    want_latents = (mean - TINY.shift_factor) * TINY.scaling_factor  # as the FLUX pipelines normalise
    got_latents = ours.encode(images)
    assert got_latents.shape == (2, 16, 12, 8)
    torch.testing.assert_close(got_latents, want_latents, rtol=0, atol=ATOL)

    want_images = reference.decode(want_latents / TINY.scaling_factor + TINY.shift_factor).sample
    got_images = ours.decode(want_latents)
    assert got_images.shape == images.shape
    torch.testing.assert_close(got_images, want_images, rtol=0, atol=ATOL)


def test_key_map_agrees_with_diffusers_single_file_converter(reference) -> None:
    """diffusers' converter maps our original names back to exactly its own state dict."""
    want = reference.state_dict()
    original = diffusers_to_original(want, TINY)
    assert set(original) == set(FluxVAE(TINY).state_dict())
    assert original["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.1.upsample.conv.weight" in original and "decoder.up.0.block.2.conv1.weight" in original
    cfg = config_to_diffusers_json(TINY)
    converted = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in original.items()}, cfg)
    assert set(converted) == set(want)
    for k, v in want.items():
        assert torch.equal(converted[k], v), k
    back = original_to_diffusers(original, TINY)
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)


@torch.no_grad()
def test_loads_both_layouts_and_release_folders(tmp_path: Path, reference, ours, images) -> None:
    from safetensors.torch import save_file

    original = {k: v.contiguous() for k, v in diffusers_to_original(reference.state_dict(), TINY).items()}
    release_bfl = tmp_path / "bfl"
    release_bfl.mkdir()
    save_file(original, str(release_bfl / "ae.safetensors"))
    release_hf = tmp_path / "hf"
    reference.save_pretrained(release_hf / "vae")  # diffusers writes the folder itself

    want = ours.encode(images)
    for path in (release_bfl / "ae.safetensors", release_bfl, release_hf / "vae", release_hf):
        model = FluxVAE.from_pretrained(path)
        assert model.config.block_out_channels == TINY.block_out_channels
        assert model.config.scaling_factor == pytest.approx(0.3611)
        assert model.config.shift_factor == pytest.approx(0.1159)
        torch.testing.assert_close(model.encode(images), want, rtol=0, atol=0)

    # Our own writer round-trips through diffusers' reader.
    ours.save_pretrained(tmp_path / "ours_vae", layout="diffusers")
    again = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours_vae")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_strict_loading_names_keys_and_file(tmp_path: Path, reference) -> None:
    from safetensors.torch import save_file

    original = diffusers_to_original(reference.state_dict(), TINY)
    original.pop("decoder.mid.attn_1.k.bias")
    original["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"(?s)ae\.safetensors.*decoder\.mid\.attn_1\.k\.bias.*decoder\.extra"):
        FluxVAE.from_pretrained(path)
    with pytest.raises(CheckpointError, match="no FLUX VAE"):
        FluxVAE.from_pretrained(tmp_path / "missing")
    folder = tmp_path / "quant_vae"
    reference.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "use_quant_conv": True}))
    with pytest.raises(CheckpointError, match=r"use_quant_conv=True \(need False\)"):
        FluxVAE.from_pretrained(folder)
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="not a FLUX autoencoder"):
        FluxVAE.from_pretrained(tmp_path / "bad.safetensors")


def test_bad_inputs_name_the_shape(ours) -> None:
    with pytest.raises(ValueError, match="multiples of 2"):
        ours.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"latents must be \(B, 16"):
        ours.decode(torch.zeros(1, 4, 8, 8))


def test_released_preset_parameter_count_and_config() -> None:
    with meta_device():
        model = FluxVAE(FLUX1_VAE)
    assert sum(p.numel() for p in model.parameters()) == 83_819_683
    assert len(model.state_dict()) == 244
    assert FLUX1_VAE.spatial_stride == 8 and FLUX1_VAE.latent_channels == 16
    assert infer_config_from_original(model.state_dict()) == FLUX1_VAE
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        FluxVAEConfig(block_out_channels=(48, 64))


def test_config_modules_import_no_torch() -> None:
    code = ("import sys, models.flux.vae_config, models.flux.text_config; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_diffusers_json_is_what_diffusers_writes(tmp_path: Path, reference) -> None:
    reference.save_config(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    ours = config_to_diffusers_json(TINY)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                "use_quant_conv", "use_post_quant_conv", "down_block_types", "up_block_types"):
        assert written[key] == ours[key], key
