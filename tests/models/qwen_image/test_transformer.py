"""QwenImageTransformer: parity with diffusers `QwenImageTransformer2DModel`, the block protocol, the release's
parameter count on the meta device, config.json round trips, loading a diffusers folder and strict-key errors.

All on CPU in fp32 with tiny models whose every parameter is randomised in the diffusers model (diffusers inits
the norms to ones, which would hide norm mistakes), then copied into ours with a strict load. The latent is
6 x 10 (a non-square 3 x 5 token grid, so a row/column mix-up or wrong centring of the RoPE positions shows), the
text 7 tokens; the masked cases pad one sample's text.

Around the reference we do what its pipeline does: pack the latent with the pipeline's own `_pack_latents`, pass
`img_shapes` [(1, h, w)] and `timestep` = sigma, unpack with `_unpack_latents`.
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
from models.qwen_image.config import PRESETS, QwenImageDiTConfig
from models.qwen_image.transformer import QwenImageTransformer, pack_latents, position_ids, unpack_latents
from models.random_init import randomize_parameters

pytest.importorskip("diffusers")
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402

DIFFUSERS_TINY = PRESETS["qwen-image-tiny"].dit  # diffusers' own test config
# head_dim 16 = 8 + 4 + 4, 4 heads, 3 layers, a text width unlike d, 8 latent channels.
TINY = QwenImageDiTConfig(num_layers=3, num_attention_heads=4, attention_head_dim=16, joint_attention_dim=24,
                          in_channels=32, out_channels=8, patch_size=2, axes_dims_rope=(8, 4, 4))

# Measured max abs error vs diffusers: 0.0 in every case below (|out| about 3): the port runs the reference's
# operations in its order, RoPE angles included, and the seam's SDPA gets the same [text, image] sequence and the
# same bool key mask. The tolerance asks for bitwise equality; `assert_close` with 0 is `torch.equal` plus a
# readable message. That is with the plain GEMMs (`twin` turns the CPU weight prepacking off); the prepacked
# MKL / oneDNN GEMMs sum in another order, within PACKED_ATOL of them (`test_prepacked_gemms_...`).
ATOL = RTOL = 0.0
PACKED_ATOL = 2e-6  # measured 4.8e-7 (|out| about 3): the blocked GEMM kernels' summation order

LATENT = (6, 10)  # (H/8, W/8) -> a 3 x 5 token grid
TEXT_LEN = 7
SIGMA = torch.tensor([0.75, 0.125])
T_PROTOCOL = torch.tensor([750.0, 125.0])  # 1000 * sigma; t / 1000 is exactly SIGMA


def reference(cfg: QwenImageDiTConfig, seed: int = 0) -> torch.nn.Module:
    ref = QwenImageTransformer2DModel.from_config(cfg.to_diffusers_json()).eval()
    randomize_parameters(ref, seed=seed)
    assert ref.txt_norm.weight.std() > 0
    return ref.requires_grad_(False)


def twin(ref: torch.nn.Module, cfg: QwenImageDiTConfig) -> QwenImageTransformer:
    """Ours, holding a copy of the reference's weights (strict: every key on both sides)."""
    model = QwenImageTransformer(cfg).eval().requires_grad_(False).set_weight_prepacking(False)
    model.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True)
    return model


def inputs(cfg: QwenImageDiTConfig, batch: int = 2, text_len: int = TEXT_LEN, latent: tuple[int, int] = LATENT,
           seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.latent_channels, *latent, generator=gen)
    context = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=gen)
    return latents, context


def padding_mask(batch: int = 2, text_len: int = TEXT_LEN, valid: int = 4) -> torch.Tensor:
    """The pipeline's mask for a batch whose last prompt has `valid` tokens (int64, ones then zeros)."""
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[-1, valid:] = 0
    return mask


@torch.no_grad()
def reference_output(ref: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's velocity as (B, C, H, W), packed and unpacked by the pipeline's own helpers."""
    b, c, h, w = latents.shape
    packed = QwenImagePipeline._pack_latents(latents, b, c, h, w)
    out = ref(hidden_states=packed, encoder_hidden_states=context, encoder_hidden_states_mask=mask, timestep=sigma,
              img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8).squeeze(2)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, QwenImageTransformer]:
    ref = reference(TINY)
    return ref, twin(ref, TINY)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------
def test_protocol_times_map_exactly_to_sigma() -> None:
    assert torch.equal(T_PROTOCOL / 1000, SIGMA)


@pytest.mark.parametrize("masked", [False, True], ids=["no-padding", "padded-text"])
@torch.no_grad()
def test_parity_non_square_latent(pair, masked) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    latents, context = inputs(TINY)
    mask = padding_mask() if masked else None
    theirs = reference_output(ref, latents, SIGMA, context, mask)
    out = ours(latents, SIGMA, context, mask)
    assert out.shape == latents.shape
    assert theirs.abs().max() > 1.0
    assert max_error(out, theirs) == 0.0
    torch.testing.assert_close(out, theirs, atol=ATOL, rtol=RTOL)
    # a scalar timestep applies to the whole batch
    torch.testing.assert_close(ours(latents, 0.5, context, mask),
                               reference_output(ref, latents, torch.tensor([0.5, 0.5]), context, mask),
                               atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_the_mask_matters_and_masked_rows_are_ignored(pair) -> None:  # type: ignore[no-untyped-def]
    """Masked text rows change nothing of the image output (up to rounding: other rows of the softmax), and
    the padded sample equals its unpadded run up to that rounding; without the mask they do change it."""
    _, ours = pair
    latents, context = inputs(TINY)
    mask = padding_mask()
    out = ours(latents, SIGMA, context, mask)
    junk = context.clone()
    junk[1, 4:] = 100.0
    torch.testing.assert_close(ours(latents, SIGMA, junk, mask), out, atol=1e-5, rtol=1e-5)
    alone = ours(latents[1:], SIGMA[1:], context[1:, :4])
    torch.testing.assert_close(alone, out[1:], atol=1e-5, rtol=1e-5)
    assert max_error(ours(latents, SIGMA, context), out) > 1e-3


@torch.no_grad()
def test_prepacked_gemms_agree_with_the_plain_ones(pair) -> None:  # type: ignore[no-untyped-def]
    """An 8 x 8 token grid: 64 rows per GEMM, so the CPU prepacked path runs (GELU in the epilogue included)."""
    ref, ours = pair
    latents, context = inputs(TINY, latent=(16, 16))
    plain = ours(latents, SIGMA, context)
    packed = ours.set_weight_prepacking(True)(latents, SIGMA, context)
    try:
        assert ours.packed_weight_bytes() > 0
        torch.testing.assert_close(packed, plain, atol=PACKED_ATOL, rtol=0)
        torch.testing.assert_close(packed, reference_output(ref, latents, SIGMA, context), atol=PACKED_ATOL, rtol=0)
    finally:
        ours.set_weight_prepacking(False)


@pytest.mark.parametrize("text_len, latent", [(1, (2, 2)), (5, (10, 4)), (12, (8, 8))])
@torch.no_grad()
def test_parity_other_shapes(pair, text_len, latent) -> None:  # type: ignore[no-untyped-def]
    """One token of each, a tall grid (5 x 2: odd rows, text positions from max(2, 1)), a square 4 x 4 grid."""
    ref, ours = pair
    latents, context = inputs(TINY, text_len=text_len, latent=latent, seed=3)
    torch.testing.assert_close(ours(latents, SIGMA, context), reference_output(ref, latents, SIGMA, context),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("masked", [False, True], ids=["no-padding", "padded-text"])
@torch.no_grad()
def test_parity_diffusers_test_config(masked) -> None:  # type: ignore[no-untyped-def]
    ref = reference(DIFFUSERS_TINY, seed=4)
    ours = twin(ref, DIFFUSERS_TINY)
    latents, context = inputs(DIFFUSERS_TINY, seed=5)
    mask = padding_mask(valid=2) if masked else None
    torch.testing.assert_close(ours(latents, SIGMA, context, mask),
                               reference_output(ref, latents, SIGMA, context, mask), atol=ATOL, rtol=RTOL)


def test_position_ids_are_centred() -> None:
    txt, img = position_ids(4, (5, 6))
    assert torch.equal(img[:, 0], torch.zeros(30, dtype=torch.long))
    assert sorted(set(img[:, 1].tolist())) == [-3, -2, -1, 0, 1]
    assert sorted(set(img[:, 2].tolist())) == [-3, -2, -1, 0, 1, 2]
    assert img[1].tolist() == [0, -3, -2]  # row-major: the second token is row -3, column -2
    assert txt.tolist() == [[p, p, p] for p in range(3, 7)]


def test_packing_matches_the_pipeline_and_inverts() -> None:
    x = torch.randn(2, 4, 6, 10)
    tokens = pack_latents(x)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(x, 2, 4, 6, 10))
    assert torch.equal(unpack_latents(tokens, (3, 5)), x)


# ---------------------------------------------------------------------------------------------
# block protocol
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_block_protocol_gives_the_reference_velocity(pair) -> None:  # type: ignore[no-untyped-def]
    """begin (t = 1000 sigma, per-branch conditionings of unequal length) -> blocks -> head -> to_latents equals
    the reference fed what the pipeline feeds it: the zero-padded batch with its bool mask."""
    ref, ours = pair
    latents, context = inputs(TINY)
    conditioning = [Conditioning(context[0]), Conditioning(context[1, :4])]
    state = ours.begin(latents, T_PROTOCOL, conditioning, None)
    assert state.text_len == TEXT_LEN and state.img.shape[1] == 15
    assert state.model.text_mask.tolist() == padding_mask().bool().tolist()
    img, txt = state.img, state.txt
    for block in ours.blocks:
        img, txt = ours.run_block(block, img, txt, state)
    velocity = ours.to_latents(ours.run_head(img, state), state)
    padded = context.clone()
    padded[1, 4:] = 0.0
    theirs = reference_output(ref, latents, T_PROTOCOL / 1000, padded, padding_mask())
    torch.testing.assert_close(velocity, theirs, atol=ATOL, rtol=RTOL)
    signal = ours.cache_signal(state, "modulated_input")
    assert signal.per_token and signal.values.shape == state.img.shape
    with pytest.raises(ValueError, match="modulated_input"):
        ours.cache_signal(state, "nope")


@torch.no_grad()
def test_begin_passes_no_mask_without_padding(pair) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    latents, context = inputs(TINY)
    full = torch.ones(TEXT_LEN, dtype=torch.bool)
    state = ours.begin(latents, T_PROTOCOL, [Conditioning(context[0], mask=full), Conditioning(context[1])], None)
    assert state.model.text_mask is None
    img, txt = state.img, state.txt
    for block in ours.blocks:
        img, txt = ours.run_block(block, img, txt, state)
    torch.testing.assert_close(ours.to_latents(ours.run_head(img, state), state),
                               reference_output(ref, latents, T_PROTOCOL / 1000, context), atol=ATOL, rtol=RTOL)


def test_begin_and_prepare_refuse_what_they_do_not_take(pair) -> None:  # type: ignore[no-untyped-def]
    _, ours = pair
    latents, context = inputs(TINY)
    with pytest.raises(ValueError, match="guidance"):
        ours.begin(latents, T_PROTOCOL, [Conditioning(c) for c in context], torch.ones(2))
    with pytest.raises(ValueError, match="must be even"):
        ours(latents[:, :, :5], SIGMA, context)
    with pytest.raises(ValueError, match="mask must be"):
        ours(latents, SIGMA, context, torch.ones(2, 3))
    with pytest.raises(ValueError, match="leave the model's range"):
        ours(latents, SIGMA, torch.randn(2, 4095, TINY.joint_attention_dim))


def test_attention_goes_through_the_seam(pair) -> None:  # type: ignore[no-untyped-def]
    ref, _ = pair
    ours = twin(ref, TINY)
    seen: list[AttentionMeta] = []

    def spy(q, k, v, meta):  # type: ignore[no-untyped-def]
        seen.append(meta)
        mask = meta.key_mask(k.shape[1])
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2), attn_mask=mask).transpose(1, 2)

    ours.set_attention(spy)
    latents, context = inputs(TINY)
    mask = padding_mask()
    with torch.no_grad():
        out = ours(latents, SIGMA, context, mask)
    assert [(m.layer, m.kind, m.text_len) for m in seen] == [(i, "joint", TEXT_LEN) for i in range(3)]
    assert all(m.text_mask.dtype == torch.bool and m.text_mask.tolist() == mask.bool().tolist() for m in seen)
    torch.testing.assert_close(out, reference_output(ref, latents, SIGMA, context, mask), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# config and parameter count
# ---------------------------------------------------------------------------------------------
def test_release_parameter_count_on_meta() -> None:
    cfg = PRESETS["qwen-image"].dit
    with meta_device():
        model = QwenImageTransformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == 20_430_401_088
    assert len(model.state_dict()) == 1933
    with meta_device():
        ref = QwenImageTransformer2DModel.from_config(cfg.to_diffusers_json())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}
    d, h = cfg.dim, cfg.head_dim
    assert d == 3072
    block = 36 * d * d + 30 * d + 4 * h
    assert sum(p.numel() for p in model.transformer_blocks[0].parameters()) == block
    stem = (256 * d + d + d * d + d) + 3584 + 65 * d + (3584 * d + d) + (2 * d * d + 2 * d) + (64 * d + 64)
    assert 60 * block + stem == 20_430_401_088


def test_state_dict_keys_equal_diffusers() -> None:
    ref = QwenImageTransformer2DModel.from_config(TINY.to_diffusers_json())
    ours = QwenImageTransformer(TINY)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_config_json_round_trip() -> None:
    for cfg in (TINY, DIFFUSERS_TINY, PRESETS["qwen-image"].dit):
        js = cfg.to_diffusers_json()
        assert QwenImageDiTConfig.from_diffusers_json(json.loads(json.dumps(js))) == cfg
        with meta_device():  # the release in fp32 would need 82 GB
            ref_cfg = dict(QwenImageTransformer2DModel.from_config(js).config)
        assert QwenImageDiTConfig.from_diffusers_json(ref_cfg) == cfg
    # an empty config.json reads diffusers' defaults, which are the release
    assert QwenImageDiTConfig.from_diffusers_json({}) == PRESETS["qwen-image"].dit
    assert QwenImageDiTConfig.from_diffusers_json({"out_channels": None, "in_channels": 64,
                                                   "patch_size": 1}).out_channels == 64
    for flag in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
        with pytest.raises(ValueError, match=flag):
            QwenImageDiTConfig.from_diffusers_json({**TINY.to_diffusers_json(), flag: True})
    with pytest.raises(ValueError, match="patch_size"):
        QwenImageDiTConfig(in_channels=64, out_channels=8)
    with pytest.raises(ValueError, match="sum to"):
        QwenImageDiTConfig(axes_dims_rope=(16, 56, 48))


def test_latent_geometry() -> None:
    with meta_device():
        geometry = QwenImageTransformer(PRESETS["qwen-image"].dit).latent
        tiny = QwenImageTransformer(TINY).latent
    assert geometry.latent_shape(1, 1328, 1024) == (16, 166, 128)
    assert geometry.tokens(1, 1328, 1024) == 83 * 64
    assert tiny.latent_shape(1, 64, 32) == (8, 8, 4)  # the config's latent channels


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_from_pretrained_sharded_diffusers_release_folder(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="50KB", safe_serialization=True)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = QwenImageTransformer.from_pretrained(tmp_path)  # the release root
    assert loaded.config == TINY
    latents, context = inputs(TINY)
    mask = padding_mask()
    assert torch.equal(loaded(latents, SIGMA, context, mask), reference_output(ref, latents, SIGMA, context, mask))
    again = QwenImageTransformer.from_pretrained(tmp_path / "transformer")  # the transformer folder itself
    assert torch.equal(again.txt_norm.weight, ref.txt_norm.weight)


@torch.no_grad()
def test_save_pretrained_loads_in_diffusers(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    ours.save_pretrained(tmp_path, max_shard_bytes=60_000)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    back = QwenImageTransformer2DModel.from_pretrained(tmp_path).eval()
    latents, context = inputs(TINY)
    assert torch.equal(reference_output(back, latents, SIGMA, context), reference_output(ref, latents, SIGMA, context))


def test_bf16_load_keeps_the_small_parameters_fp32(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, ours = pair
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = QwenImageTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["transformer_blocks.0.attn.to_q.weight"] == torch.bfloat16
    assert dtypes["transformer_blocks.0.img_mod.1.weight"] == torch.bfloat16
    for key in ("time_text_embed.timestep_embedder.linear_1.weight", "txt_norm.weight", "norm_out.linear.weight",
                "proj_out.bias", "transformer_blocks.0.attn.norm_q.weight", "transformer_blocks.2.attn.norm_added_k.weight"):
        assert dtypes[key] == torch.float32, key
    latents, context = inputs(TINY)
    with torch.no_grad():
        out = model(latents.bfloat16(), SIGMA, context.bfloat16()).float()
        full = ours(latents, SIGMA, context)
    assert torch.isfinite(out).all()
    assert (out - full).abs().max() < 0.1 * full.abs().max()


def test_missing_and_unexpected_keys_are_clear_errors(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref, _ = pair
    ref.save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["transformer_blocks.1.txt_mlp.net.2.weight"]
    sd["transformer_blocks.9.attn.to_qkv.weight"] = torch.zeros(3)
    sd["proj_out.weight"] = torch.zeros(5, TINY.dim)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as err:
        QwenImageTransformer.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing keys: transformer_blocks.1.txt_mlp.net.2.weight" in message
    assert "unexpected keys: transformer_blocks.9.attn.to_qkv.weight" in message
    assert "shape mismatches: proj_out.weight" in message
    assert str(path) in message


def test_wrong_folder_or_class_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a Qwen-Image checkpoint"):
        QwenImageTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="is not QwenImageTransformer2DModel"):
        QwenImageTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY.to_diffusers_json(), "use_layer3d_rope": True}))
    with pytest.raises(CheckpointError, match="use_layer3d_rope"):
        QwenImageTransformer.from_pretrained(tmp_path)
