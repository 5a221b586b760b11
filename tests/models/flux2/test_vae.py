"""FLUX.2 autoencoder: parity with diffusers `AutoencoderKLFlux2`, key maps, both checkpoint layouts.

CPU, fp32, tiny widths (32, 64) with GroupNorm's 32 groups, 2 ResNets per level, 32 latent channels, every
parameter randomised (norm weights ~ 1 + 0.1 randn, all biases) and the BatchNorm's running mean and variance
randomised too (the released statistics are far from 0 / 1; identity statistics would hide a swapped or
missing normalisation). The reference's latents are normalised and denormalised exactly as diffusers'
Flux2KleinPipeline does it (patchify + BatchNorm statistics around the VAE).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.flux2.tiny import randomize_batch_norm
from models.flux2.vae import Flux2VAE, config_to_diffusers_json, infer_config_from_original
from models.flux2.vae_config import FLUX2_VAE, Flux2VAEConfig
from models.flux2.vae_keys import diffusers_to_original, original_to_diffusers
from models.loading import CheckpointError, meta_device
from models.random_init import randomize_parameters

TINY = Flux2VAEConfig(block_out_channels=(32, 64), layers_per_block=2, latent_channels=32)
# Same operations in the same order and memory layout: measured max |diff| = 0 for encode and decode.
# The tolerance only allows for a CPU whose conv/SDPA kernels round differently for either layout.
ATOL = 1e-5


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def reference(diffusers):
    cfg = {k: v for k, v in config_to_diffusers_json(TINY).items() if not k.startswith("_")}
    model = randomize_parameters(diffusers.AutoencoderKLFlux2(**cfg).eval(), seed=0)
    return randomize_batch_norm(model, seed=1)


@pytest.fixture(scope="module")
def ours(reference) -> Flux2VAE:
    model = Flux2VAE(TINY)
    model.load_state_dict(diffusers_to_original(reference.state_dict(), TINY), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(2, 3, 24, 16, generator=g) * 2 - 1  # non-square, batch 2


def _pipeline_statistics(reference) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std Flux2KleinPipeline applies around the VAE (its `_encode_vae_image` and decode path)."""
    mean = reference.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(reference.bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
    return mean, std


@torch.no_grad()
def test_encode_decode_match_the_pipeline(diffusers, reference, ours, images) -> None:
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    mean, std = _pipeline_statistics(reference)
    posterior = reference.encode(images).latent_dist.mode()
    want_latents = (Flux2KleinPipeline._patchify_latents(posterior) - mean) / std
    got_latents = ours.encode(images)
    assert got_latents.shape == (2, 128, 6, 4)  # stride 4: two levels, then the 2x2 patches
    torch.testing.assert_close(got_latents, want_latents, rtol=0, atol=ATOL)

    latents = torch.randn(2, 128, 6, 4, generator=torch.Generator().manual_seed(3))
    want_images = reference.decode(Flux2KleinPipeline._unpatchify_latents(latents * std + mean)).sample
    got_images = ours.decode(latents)
    assert got_images.shape == images.shape
    torch.testing.assert_close(got_images, want_images, rtol=0, atol=ATOL)
    # The statistics matter: decoding without them gives other pixels.
    plain = reference.decode(Flux2KleinPipeline._unpatchify_latents(latents)).sample
    assert (plain - got_images).abs().max() > 0.01


def test_key_map_round_trips_and_matches_bfl_names(reference) -> None:
    want = reference.state_dict()
    original = diffusers_to_original(want, TINY)
    assert set(original) == set(Flux2VAE(TINY).state_dict())
    for key in ("encoder.quant_conv.weight", "decoder.post_quant_conv.bias", "bn.running_var",
                "encoder.mid.attn_1.q.weight", "decoder.up.1.upsample.conv.weight"):
        assert key in original, key
    assert original["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    back = original_to_diffusers(original, TINY)
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
    # A BFL file without the BatchNorm counter maps to a full diffusers state dict.
    without = {k: v for k, v in original.items() if k != "bn.num_batches_tracked"}
    assert set(original_to_diffusers(without, TINY)) == set(want)


@torch.no_grad()
def test_loads_both_layouts_and_release_folders(tmp_path: Path, diffusers, reference, ours, images) -> None:
    from safetensors.torch import save_file

    original = {k: v.contiguous() for k, v in diffusers_to_original(reference.state_dict(), TINY).items()
                if k != "bn.num_batches_tracked"}  # as diffusers' converter leaves it out
    release_bfl = tmp_path / "bfl"
    release_bfl.mkdir()
    save_file(original, str(release_bfl / "flux2-vae.safetensors"))
    release_hf = tmp_path / "hf"
    reference.save_pretrained(release_hf / "vae")  # diffusers writes the folder itself

    want = ours.encode(images)
    for path in (release_bfl / "flux2-vae.safetensors", release_bfl, release_hf / "vae", release_hf):
        model = Flux2VAE.from_pretrained(path)
        assert model.config == TINY, path
        torch.testing.assert_close(model.encode(images), want, rtol=0, atol=0)

    # Our own writer round-trips through diffusers' reader.
    ours.save_pretrained(tmp_path / "ours_vae", layout="diffusers")
    again = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "ours_vae")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in reference.state_dict().items())
    ours.save_pretrained(tmp_path / "ours.safetensors", layout="original")
    torch.testing.assert_close(Flux2VAE.from_pretrained(tmp_path / "ours.safetensors").encode(images), want,
                               rtol=0, atol=0)


def test_strict_loading_names_keys_and_settings(tmp_path: Path, diffusers, reference) -> None:
    from safetensors.torch import save_file

    from models.flux.vae import FluxVAE
    from models.flux.vae_config import FluxVAEConfig

    original = diffusers_to_original(reference.state_dict(), TINY)
    original.pop("decoder.post_quant_conv.bias")
    original["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "flux2-vae.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"(?s)flux2-vae\.safetensors.*post_quant_conv\.bias.*decoder\.extra"):
        Flux2VAE.from_pretrained(path)
    with pytest.raises(CheckpointError, match="no FLUX.2 VAE"):
        Flux2VAE.from_pretrained(tmp_path / "missing")
    flux1 = tmp_path / "ae.safetensors"
    FluxVAE(FluxVAEConfig(block_out_channels=(32, 64), layers_per_block=1)).save_pretrained(flux1)
    with pytest.raises(CheckpointError, match="FLUX.1-style autoencoder without"):
        Flux2VAE.from_pretrained(flux1)
    folder = tmp_path / "vae"
    reference.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "use_quant_conv": False, "patch_size": [1, 1]}))
    with pytest.raises(CheckpointError, match=r"use_quant_conv=False \(need True\).*patch_size=\[1, 1\]"):
        Flux2VAE.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="not 'AutoencoderKLFlux2'"):
        Flux2VAE.from_pretrained(folder)


def test_bad_inputs_name_the_shape(ours) -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        ours.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"latents must be \(B, 128"):
        ours.decode(torch.zeros(1, 32, 8, 8))


def test_released_preset_parameter_count_and_config() -> None:
    with meta_device():
        model = Flux2VAE(FLUX2_VAE)
    assert sum(p.numel() for p in model.parameters()) == 84_046_115
    assert sum(b.numel() for b in model.buffers()) == 257  # running mean + var (128 each) + the counter
    assert FLUX2_VAE.spatial_stride == 16 and FLUX2_VAE.dit_channels == 128 and FLUX2_VAE.latent_channels == 32
    assert infer_config_from_original(model.state_dict()) == FLUX2_VAE
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        Flux2VAEConfig(block_out_channels=(48, 64))
    with pytest.raises(ValueError, match="patch must be 2"):
        Flux2VAEConfig(patch=1)


def test_config_module_imports_no_torch() -> None:
    code = "import sys, models.flux2.vae_config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_diffusers_json_is_what_diffusers_writes(tmp_path: Path, reference) -> None:
    reference.save_config(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    ours = config_to_diffusers_json(TINY)
    for key in set(written) - {"_diffusers_version"}:
        assert written[key] == ours[key], key
