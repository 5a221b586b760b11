"""ZImageTransformer: parity with diffusers `ZImageTransformer2DModel`, the block protocol, the release's parameter
count on the meta device, config.json round trips, loading a diffusers folder and strict-key errors.

All on CPU in fp32 with tiny models whose every parameter is randomised in the diffusers model (diffusers inits
the pad tokens to zeros and the norms to ones, which would hide pad or norm mistakes), then copied into ours with
a strict load. The caption has 7 tokens (padded to 32) and the latent is 6 x 10 (a non-square 3 x 5 token grid,
15 tokens padded to 32), so the pad tokens, their positions and a row/column mix-up all show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.attention import AttentionMeta
from models.conditioning import Conditioning
from models.loading import CheckpointError, meta_device
from models.random_init import randomize_parameters
from models.z_image.config import PRESETS, ZImageDiTConfig
from models.z_image.transformer import ZImageTransformer, patchify, position_ids, unpatchify

diffusers = pytest.importorskip("diffusers")

# head_dim 16 = 8 + 4 + 4 (diffusers' test split), 2 heads, 2 refiner blocks of each kind and 2 main layers, a
# caption width unlike dim.
TINY = ZImageDiTConfig(dim=32, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=2, cap_feat_dim=24,
                       axes_dims=(8, 4, 4), axes_lens=(256, 32, 32), rope_theta=256.0)
DIFFUSERS_TINY = PRESETS["z-image-tiny"].dit  # diffusers' own test config

# Measured max abs error vs diffusers (|out| 2.7-4.6): 0.95e-6 to 1.64e-6 over the cases below. It comes
# only from the order of the unified sequence: the reference attends over [image, caption], this port hands
# the seam [caption, image] (text first, the layout context parallelism expects), so SDPA sums the softmax
# over keys in another order. With the reference order the output is bitwise equal
# (test_bitwise_with_the_reference_sequence_order).
ATOL = RTOL = 1e-5

LATENT = (6, 10)  # (H/8, W/8) -> a 3 x 5 token grid
CAPTION_LEN = 7
# The model's time t = 1 - sigma; the protocol's t = 1000 sigma. These survive (1000 - t) / 1000 exactly.
T_MODEL = torch.tensor([0.25, 0.875])
T_PROTOCOL = torch.tensor([750.0, 125.0])


def reference(cfg: ZImageDiTConfig, seed: int = 0) -> torch.nn.Module:
    ref = diffusers.ZImageTransformer2DModel.from_config(cfg.to_diffusers_json()).eval()
    randomize_parameters(ref, seed=seed)
    assert ref.x_pad_token.abs().min() > 0 and ref.cap_pad_token.abs().min() > 0
    return ref.requires_grad_(False)


def twin(ref: torch.nn.Module, cfg: ZImageDiTConfig, cls: type = ZImageTransformer) -> ZImageTransformer:
    """Ours, holding a copy of the reference's weights (strict: every key on both sides)."""
    model = cls(cfg).eval().requires_grad_(False)
    model.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True)
    return model


def inputs(cfg: ZImageDiTConfig, batch: int = 2, caption_len: int = CAPTION_LEN, latent: tuple[int, int] = LATENT,
           seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, *latent, generator=gen)
    captions = torch.randn(batch, caption_len, cfg.cap_feat_dim, generator=gen)
    return latents, captions


@torch.no_grad()
def reference_output(ref: torch.nn.Module, latents: torch.Tensor, t_model: torch.Tensor,
                     captions: torch.Tensor) -> torch.Tensor:
    """What the diffusers pipeline does around its transformer: lists of [C, 1, H, W] and [L, cap], stacked."""
    out = ref([x.unsqueeze(1) for x in latents], t_model, list(captions), return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, ZImageTransformer]:
    ref = reference(TINY)
    return ref, twin(ref, TINY)


class ReferenceOrder(ZImageTransformer):
    """Main layers over [image, caption], the reference's order (self-attention, no seam metadata)."""

    def run_block(self, block, img, txt, state):  # type: ignore[no-untyped-def]
        if block.kind != "main":
            return super().run_block(block, img, txt, state)
        n = state.text_len
        rope = tuple(torch.cat([r[n:], r[:n]]) for r in state.rope)
        x = block(torch.cat([img, txt], dim=1), rope, state.model.adaln, AttentionMeta(layer=block.layer))
        return x[:, : img.shape[1]], x[:, img.shape[1]:]


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------
def test_protocol_times_map_exactly_to_model_times() -> None:
    assert torch.equal((1000 - T_PROTOCOL) / 1000, T_MODEL)


@torch.no_grad()
def test_parity_padded_caption_and_non_square_latent(pair) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    latents, captions = inputs(TINY)
    theirs = reference_output(ref, latents, T_MODEL, captions)
    out = ours(latents, T_MODEL, captions)
    assert out.shape == latents.shape
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(out, theirs, atol=ATOL, rtol=RTOL)
    # each sample depends only on its own inputs; a scalar t applies to the whole batch
    torch.testing.assert_close(ours(latents[1:], T_MODEL[1:], captions[1:]), out[1:], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours(latents, 0.5, captions),
                               reference_output(ref, latents, torch.tensor([0.5, 0.5]), captions),
                               atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_bitwise_with_the_reference_sequence_order(pair) -> None:  # type: ignore[no-untyped-def]
    """Everything but the key order of the main layers' attention is bitwise the reference's."""
    ref, _ = pair
    latents, captions = inputs(TINY)
    ours = twin(ref, TINY, ReferenceOrder)
    assert torch.equal(ours(latents, T_MODEL, captions), reference_output(ref, latents, T_MODEL, captions))


@pytest.mark.parametrize("caption_len, latent", [(32, (8, 16)), (33, (2, 2)), (1, (4, 6))])
@torch.no_grad()
def test_parity_other_padding_cases(pair, caption_len, latent) -> None:  # type: ignore[no-untyped-def]
    """No padding at all (32 + 32 tokens), 31 caption pads with one image token, a one-token caption."""
    ref, ours = pair
    latents, captions = inputs(TINY, caption_len=caption_len, latent=latent, seed=3)
    torch.testing.assert_close(ours(latents, T_MODEL, captions), reference_output(ref, latents, T_MODEL, captions),
                               atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_parity_diffusers_test_config() -> None:
    ref = reference(DIFFUSERS_TINY, seed=4)
    ours = twin(ref, DIFFUSERS_TINY)
    latents, captions = inputs(DIFFUSERS_TINY, seed=5)
    torch.testing.assert_close(ours(latents, T_MODEL, captions), reference_output(ref, latents, T_MODEL, captions),
                               atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_pad_tokens_are_attended(pair) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    latents, captions = inputs(TINY)
    base = ours(latents, T_MODEL, captions)
    for name in ("x_pad_token", "cap_pad_token"):
        other = twin(ref, TINY)
        getattr(other, name).add_(1.0)
        assert not torch.allclose(other(latents, T_MODEL, captions), base), name


def test_position_ids() -> None:
    cap, img = position_ids(5, (2, 3))
    assert cap.shape == (32, 3) and torch.equal(cap[:, 0], torch.arange(1, 33)) and not cap[:, 1:].any()
    assert img.shape == (32, 3)
    assert torch.equal(img[:6], torch.tensor([[33, r, c] for r in range(2) for c in range(3)]))
    assert not img[6:].any()


def test_patchify_is_channel_last_and_inverts() -> None:
    x = torch.randn(2, 3, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    # token (row 1, col 2), feature (pH 1, pW 0, channel 2)
    assert tokens[0, 1 * 3 + 2, (1 * 2 + 0) * 3 + 2] == x[0, 2, 2 * 1 + 1, 2 * 2 + 0]
    assert torch.equal(unpatchify(tokens, (2, 3), 2), x)


# ---------------------------------------------------------------------------------------------
# block protocol
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_block_protocol_gives_the_negated_model_output(pair) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    latents, captions = inputs(TINY)
    mask = torch.zeros(CAPTION_LEN + 3, dtype=torch.bool)
    mask[:CAPTION_LEN] = True
    junk = torch.full((3, TINY.cap_feat_dim), 1e3)
    conditioning = [Conditioning(captions[0], mask=None), Conditioning(torch.cat([captions[1], junk]), mask=mask)]
    state = ours.begin(latents, T_PROTOCOL, conditioning, None)
    assert state.text_len == 32 and state.img.shape[1] == 32
    assert [b.kind for b in ours.blocks] == ["noise"] * 2 + ["main"] * 2  # the context refiner ran in begin
    assert [b.layer for b in ours.blocks] == [0, 1, 2, 3]
    img, txt = state.img, state.txt
    for block in ours.blocks:
        img2, txt2 = ours.run_block(block, img, txt, state)
        assert img2 is not img and (txt2 is txt) == (block.kind == "noise")
        img, txt = img2, txt2
    with pytest.raises(ValueError, match="context refiner runs in begin"):
        ours.run_block(ours.context_refiner[0], img, txt, state)
    velocity = ours.to_latents(ours.run_head(img, state), state)
    theirs = reference_output(ref, latents, (1000 - T_PROTOCOL) / 1000, captions)
    torch.testing.assert_close(velocity, -theirs, atol=ATOL, rtol=RTOL)
    signal = ours.cache_signal(state, "modulated_input")
    assert signal.per_token and signal.values.shape == state.img.shape
    with pytest.raises(ValueError, match="modulated_input"):
        ours.cache_signal(state, "nope")


@pytest.mark.parametrize("lengths", [(7, 20), (40, 7), (7, 70)])
@torch.no_grad()
def test_parity_captions_of_different_lengths(pair, lengths) -> None:  # type: ignore[no-untyped-def]
    """A batch whose captions differ (a CFG pair): (7, 20) pad alike to 32 (no mask, per-sample pad rows);
    (40, 7) and (7, 70) pad to 64 / 32 and 32 / 96, so the reference masks the shorter unified sequence and
    positions each sample's image after its own caption. Through `begin` as the stages call it, too."""
    ref, ours = pair
    latents, _ = inputs(TINY)
    gen = torch.Generator().manual_seed(8)
    captions = [torch.randn(n, TINY.cap_feat_dim, generator=gen) for n in lengths]
    theirs = torch.stack(ref([x.unsqueeze(1) for x in latents], T_MODEL, captions, return_dict=False)[0]).squeeze(2)
    torch.testing.assert_close(ours(latents, T_MODEL, captions), theirs, atol=ATOL, rtol=RTOL)
    for b in range(2):  # each sample as if alone
        torch.testing.assert_close(theirs[b:b + 1], reference_output(ref, latents[b:b + 1], T_MODEL[b:b + 1],
                                                                     captions[b][None]), atol=ATOL, rtol=RTOL)
    state = ours.begin(latents, T_PROTOCOL, [Conditioning(c) for c in captions], None)
    img, txt = state.img, state.txt
    for block in ours.blocks:
        img, txt = ours.run_block(block, img, txt, state)
    torch.testing.assert_close(ours.to_latents(ours.run_head(img, state), state), -theirs, atol=ATOL, rtol=RTOL)
    pads = [c + (-c) % 32 for c in lengths]
    if pads[0] != pads[1]:
        assert state.model.text_mask.sum(1).tolist() == pads and state.rope[0].shape[1] == 2
    else:
        assert state.model.text_mask is None and state.rope[0].ndim == 2


def test_begin_refuses_what_it_does_not_implement(pair) -> None:  # type: ignore[no-untyped-def]
    _, ours = pair
    latents, captions = inputs(TINY)
    with pytest.raises(ValueError, match="guidance"):
        ours.begin(latents, T_PROTOCOL, [Conditioning(c) for c in captions], torch.ones(2))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        ours(latents[:, :, :5], T_MODEL, captions)
    with pytest.raises(ValueError, match="exceeds"):
        ours(latents, T_MODEL, torch.randn(2, 300, TINY.cap_feat_dim))


def test_attention_goes_through_the_seam(pair) -> None:  # type: ignore[no-untyped-def]
    ref, _ = pair
    ours = twin(ref, TINY)
    seen: list[AttentionMeta] = []

    def spy(q, k, v, meta):  # type: ignore[no-untyped-def]
        seen.append(meta)
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2)).transpose(1, 2)

    ours.set_attention(spy)
    latents, captions = inputs(TINY)
    with torch.no_grad():
        ours(latents, T_MODEL, captions)
    # the noise refiners' image self-attention and the main layers' joint attention; the context refiner (text
    # only, part of begin) keeps its local attention off the seam, so context parallelism never sees it
    assert [(m.layer, m.kind, m.text_len) for m in seen] == [
        (0, "self", 0), (1, "self", 0), (2, "joint", 32), (3, "joint", 32)]


# ---------------------------------------------------------------------------------------------
# config and parameter count
# ---------------------------------------------------------------------------------------------
def test_release_parameter_count_on_meta() -> None:
    cfg = PRESETS["z-image-turbo"].dit
    with meta_device():
        model = ZImageTransformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == 6_154_908_736
    assert len(model.state_dict()) == 521
    d, h, f = cfg.dim, cfg.head_dim, cfg.ffn_hidden
    modulated = 4 * d * d + 3 * d * f + 4 * d + 2 * h + (256 * 4 * d + 4 * d)
    assert sum(p.numel() for p in model.layers[0].parameters()) == modulated == 180_910_336
    assert sum(p.numel() for p in model.context_refiner[0].parameters()) == 176_962_816


def test_state_dict_keys_equal_diffusers() -> None:
    ref = diffusers.ZImageTransformer2DModel.from_config(TINY.to_diffusers_json())
    ours = ZImageTransformer(TINY)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_config_json_round_trip() -> None:
    for cfg in (TINY, PRESETS["z-image-turbo"].dit):
        js = cfg.to_diffusers_json()
        assert ZImageDiTConfig.from_diffusers_json(json.loads(json.dumps(js))) == cfg
        ref_cfg = dict(diffusers.ZImageTransformer2DModel.from_config(js).config) if cfg is TINY else js
        assert ZImageDiTConfig.from_diffusers_json(ref_cfg) == cfg
    # diffusers' default axes_lens is not the release's: a config.json without it reads diffusers' default
    assert ZImageDiTConfig.from_diffusers_json({}).axes_lens == (1024, 512, 512)
    with pytest.raises(ValueError, match="Omni"):
        ZImageDiTConfig.from_diffusers_json({**TINY.to_diffusers_json(), "siglip_feat_dim": 8})
    with pytest.raises(ValueError, match="one patch size"):
        ZImageDiTConfig.from_diffusers_json({**TINY.to_diffusers_json(), "all_patch_size": [2, 4],
                                             "all_f_patch_size": [1, 1]})


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_from_pretrained_sharded_diffusers_release_folder(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="20KB", safe_serialization=True)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = ZImageTransformer.from_pretrained(tmp_path)  # the release root
    assert loaded.config == TINY
    latents, captions = inputs(TINY)
    assert torch.equal(loaded(latents, T_MODEL, captions), ours(latents, T_MODEL, captions))
    again = ZImageTransformer.from_pretrained(tmp_path / "transformer")  # the transformer folder itself
    assert torch.equal(again.x_pad_token, ref.x_pad_token)


@torch.no_grad()
def test_save_pretrained_loads_in_diffusers(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    ours.save_pretrained(tmp_path, max_shard_bytes=30_000)
    back = diffusers.ZImageTransformer2DModel.from_pretrained(tmp_path).eval()
    latents, captions = inputs(TINY)
    assert torch.equal(reference_output(back, latents, T_MODEL, captions),
                       reference_output(ref, latents, T_MODEL, captions))


def test_bf16_load_keeps_the_small_parameters_fp32(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = ZImageTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["layers.0.attention.to_q.weight"] == torch.bfloat16
    for key in ("x_pad_token", "cap_pad_token", "t_embedder.mlp.0.weight", "cap_embedder.0.weight",
                "layers.0.attention_norm1.weight", "layers.0.attention.norm_q.weight",
                "all_final_layer.2-1.linear.weight"):
        assert dtypes[key] == torch.float32, key
    latents, captions = inputs(TINY)
    with torch.no_grad():
        out = model(latents.bfloat16(), T_MODEL, captions.bfloat16())
        full = ours(latents, T_MODEL, captions)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - full).abs().max() < 0.1 * full.abs().max()


def test_missing_and_unexpected_keys_are_clear_errors(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, _ = pair
    ref.save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["layers.1.feed_forward.w2.weight"]
    sd["layers.9.attention.qkv.weight"] = torch.zeros(3)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        ZImageTransformer.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing keys: layers.1.feed_forward.w2.weight" in message
    assert "unexpected keys: layers.9.attention.qkv.weight" in message
    assert str(path) in message


def test_wrong_folder_or_class_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a Z-Image checkpoint"):
        ZImageTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="is not ZImageTransformer2DModel"):
        ZImageTransformer.from_pretrained(tmp_path)
