"""FluxTransformer: parity with diffusers `FluxTransformer2DModel` (dev and schnell), key maps (checked against
diffusers' own single-file converter), checkpoint loading in both release layouts, strict errors, parameter
counts of the released presets on the meta device, bf16.

All on CPU in fp32 with tiny random models; every parameter is randomised (diffusers' inits leave the qk-norm
scales at one, which would hide a swapped norm). The latent is non-square (6 x 4 -> a 3 x 2 token grid) so a
row/column mix-up in the packing or the position ids shows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.flux.config import PRESETS, FluxDiTConfig
from models.flux.transformer import (
    FluxTransformer,
    apply_rope,
    pack_latents,
    position_ids,
    rope_tables,
    unpack_latents,
)
from models.flux.transformer_keys import (
    ORIGINAL_PREFIX,
    diffusers_to_original,
    diffusers_to_original_keys,
    original_to_diffusers,
    original_to_diffusers_keys,
)
from models.loading import CheckpointError, meta_device
from models.random_init import randomize_parameters

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxPosEmbed  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402

# head_dim 32 with a non-release RoPE split, so all three axes and their own frequency ladders are exercised.
TINY_DEV = FluxDiTConfig(hidden_size=64, num_heads=2, num_double_blocks=2, num_single_blocks=2, context_dim=48,
                         pooled_dim=24, axes_dims_rope=(8, 12, 12), guidance_embed=True)
TINY_SCHNELL = FluxDiTConfig(hidden_size=96, num_heads=3, num_double_blocks=1, num_single_blocks=2, context_dim=40,
                             pooled_dim=16, axes_dims_rope=(4, 14, 14), guidance_embed=False)
# head_dim 128 (release RoPE split): the shape whose original files infer their config.
TINY_RELEASE = PRESETS["flux-tiny"].dit

# Measured max abs error vs diffusers (|out| ~4): 0, bitwise equal, for TINY_DEV and TINY_SCHNELL; up to 1.3e-6
# for the head_dim-128 TINY_RELEASE (the fused qkv / linear1 GEMMs round differently from diffusers' separate
# ones at that width). The tolerance leaves room for other BLAS builds.
ATOL = RTOL = 1e-5

LATENT = (6, 4)  # (H/8, W/8) -> a 3 x 2 grid of packed tokens
TEXT_LEN = 7
# t = 1000 * sigma for our model; diffusers' model gets sigma (= t / 1000) and multiplies by 1000 itself.
# These values survive that round trip exactly in fp32 (checked below), so both models see the same t.
T = torch.tensor([937.5, 250.0])


def randomise(model: FluxTransformer, seed: int = 0) -> FluxTransformer:
    return randomize_parameters(model, seed=seed).eval().requires_grad_(False)


def diffusers_twin(model: FluxTransformer) -> torch.nn.Module:
    """diffusers `FluxTransformer2DModel` holding the same weights, through `original_to_diffusers`."""
    ref = diffusers.FluxTransformer2DModel.from_config(model.config.to_diffusers_json()).eval()
    ref.load_state_dict(original_to_diffusers(model.state_dict()), strict=True)
    assert not list(ref.buffers())  # nothing left at its init
    return ref


def inputs(cfg: FluxDiTConfig, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.latent_channels, *LATENT, generator=gen)
    context = torch.randn(batch, TEXT_LEN, cfg.context_dim, generator=gen)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=gen)
    return latents, context, pooled


@torch.no_grad()
def reference_velocity(ref: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                       pooled: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
    """What diffusers' FluxPipeline does around its transformer: pack, ids, sigma = t/1000, unpack."""
    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(context.shape[1], 3)
    out = ref(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled, timestep=t / 1000,
              img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


@pytest.fixture(scope="module")
def dev() -> FluxTransformer:
    return randomise(FluxTransformer(TINY_DEV))


@pytest.fixture(scope="module")
def release_like() -> tuple[FluxTransformer, torch.nn.Module]:
    """A head_dim-128 dev model and its diffusers twin, for the checkpoint tests."""
    model = randomise(FluxTransformer(TINY_RELEASE), seed=5)
    return model, diffusers_twin(model)


# ---------------------------------------------------------------------------------------------
# parity with diffusers
# ---------------------------------------------------------------------------------------------
def test_timesteps_survive_the_pipeline_round_trip() -> None:
    assert torch.equal(T / 1000 * 1000, T)


@torch.no_grad()
def test_parity_dev_with_guidance_non_square_latent(dev: FluxTransformer) -> None:
    ref = diffusers_twin(dev)
    latents, context, pooled = inputs(TINY_DEV)
    guidance = torch.tensor([3.5, 1.25])
    ours = dev(latents, T, context, pooled, guidance)
    theirs = reference_velocity(ref, latents, T, context, pooled, guidance)
    assert ours.shape == latents.shape and ours.dtype == latents.dtype
    assert theirs.abs().max() > 1.0  # not a comparison of near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    # the guidance input matters, and scalars apply to the whole batch
    assert not torch.allclose(dev(latents, T, context, pooled, 1.0), ours)
    torch.testing.assert_close(dev(latents, 500.0, context, pooled, 3.5),
                               reference_velocity(ref, latents, torch.tensor([500.0, 500.0]), context, pooled,
                                                  torch.tensor([3.5, 3.5])), atol=ATOL, rtol=RTOL)
    # each sample depends only on its own inputs
    torch.testing.assert_close(dev(latents[1:], T[1:], context[1:], pooled[1:], guidance[1:]), ours[1:],
                               atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_parity_schnell_loaded_from_randomised_diffusers_weights() -> None:
    """The other direction: diffusers weights (every one randomised) -> `diffusers_to_original` -> our model."""
    ref = randomize_parameters(diffusers.FluxTransformer2DModel.from_config(TINY_SCHNELL.to_diffusers_json()),
                               seed=2).eval()
    model = FluxTransformer(TINY_SCHNELL).eval()
    model.load_state_dict(diffusers_to_original(ref.state_dict()), strict=True)
    latents, context, pooled = inputs(TINY_SCHNELL, seed=3)
    ours = model(latents, T, context, pooled)
    theirs = reference_velocity(ref, latents, T, context, pooled, None)
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def test_guidance_must_match_the_model(dev: FluxTransformer) -> None:
    latents, context, pooled = inputs(TINY_DEV)
    with pytest.raises(ValueError, match="guidance embedding \\(dev\\): pass guidance"):
        dev(latents, T, context, pooled)
    schnell = FluxTransformer(TINY_SCHNELL)
    latents, context, pooled = inputs(TINY_SCHNELL)
    with pytest.raises(ValueError, match="no guidance embedding \\(schnell\\)"):
        schnell(latents, T, context, pooled, 3.5)


def test_bad_inputs_raise_clear_errors(dev: FluxTransformer) -> None:
    latents, context, pooled = inputs(TINY_DEV)
    with pytest.raises(ValueError, match="must be even"):
        dev(latents[..., :3], T, context, pooled, 3.5)
    with pytest.raises(ValueError, match="latents must be"):
        dev(latents[:, :8], T, context, pooled, 3.5)
    with pytest.raises(ValueError, match="context must be"):
        dev(latents, T, context[..., :10], pooled, 3.5)
    with pytest.raises(ValueError, match="pooled must be"):
        dev(latents, T, context, pooled[:1], 3.5)
    with pytest.raises(ValueError, match="t must be a scalar or have shape \\(2,\\)"):
        dev(latents, torch.tensor([1.0, 2.0, 3.0]), context, pooled, 3.5)


# ---------------------------------------------------------------------------------------------
# packing, ids, RoPE
# ---------------------------------------------------------------------------------------------
def test_packing_and_ids_match_the_diffusers_pipeline() -> None:
    latents = torch.randn(2, 16, 6, 4)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, (3, 2)), latents)
    ids = position_ids(TEXT_LEN, (3, 2))
    assert torch.equal(ids[:TEXT_LEN], torch.zeros(TEXT_LEN, 3))
    assert torch.equal(ids[TEXT_LEN:], FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32))


def test_rope_matches_diffusers_pos_embed_and_rotation() -> None:
    from diffusers.models.embeddings import apply_rotary_emb

    ids = position_ids(5, (3, 4))
    cos, sin = rope_tables(ids, (8, 12, 12), 10000)
    ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=[8, 12, 12])(ids)
    assert torch.equal(cos.repeat_interleave(2, dim=1), ref_cos) and torch.equal(sin.repeat_interleave(2, dim=1),
                                                                                   ref_sin)
    x = torch.randn(2, ids.shape[0], 3, 32)
    assert torch.equal(apply_rope(x, (cos, sin)), apply_rotary_emb(x, (ref_cos, ref_sin), sequence_dim=1))
    # text rows (position 0 on every axis) are not rotated
    assert torch.equal(apply_rope(x, (cos, sin))[:, :5], x[:, :5])


# ---------------------------------------------------------------------------------------------
# block protocol
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_block_protocol_is_the_forward(dev: FluxTransformer) -> None:
    latents, context, pooled = inputs(TINY_DEV)
    state = dev.prepare(latents, T, context, pooled, 3.5)
    assert state.text_len == TEXT_LEN and state.grid == (3, 2)
    assert state.img.shape == (2, 6, 64) and state.txt.shape == (2, TEXT_LEN, 64) and state.vec.shape == (2, 64)
    assert state.rope[0].shape == (TEXT_LEN + 6, 16)
    blocks = dev.blocks
    assert len(blocks) == 4 and blocks[0] is dev.double_blocks[0] and blocks[-1] is dev.single_blocks[-1]
    img, txt = state.img, state.txt
    before = state.img.clone(), state.txt.clone()
    for block in blocks:
        img, txt = block(img, txt, state.vec, state.rope)
        assert img.shape == (2, 6, 64) and txt.shape == (2, TEXT_LEN, 64)
    # blocks return new tensors and leave their inputs alone (a feature cache may keep them)
    assert torch.equal(state.img, before[0]) and torch.equal(state.txt, before[1])
    assert torch.equal(dev.finalize(img, state), dev(latents, T, context, pooled, 3.5))


@torch.no_grad()
def test_attention_seam_sees_text_first_joint_sequences(dev: FluxTransformer) -> None:
    from models.attention import sdpa_attention

    seen = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:  # noqa: ANN001
        seen.append((meta.layer, meta.kind, meta.text_len, q.shape))
        return sdpa_attention(q, k, v, meta)

    latents, context, pooled = inputs(TINY_DEV)
    expected = dev(latents, T, context, pooled, 3.5)
    dev.set_attention(spy)
    try:
        assert torch.equal(dev(latents, T, context, pooled, 3.5), expected)
    finally:
        dev.set_attention(sdpa_attention)
    # every block, double then single: joint attention over (B, L + N, H, D), text rows first
    assert seen == [(layer, "joint", TEXT_LEN, (2, TEXT_LEN + 6, 2, 32)) for layer in range(4)]


# ---------------------------------------------------------------------------------------------
# key maps and parameter counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,params,original_keys,diffusers_keys", [
    ("flux1-dev", 11_901_408_320, 780, 1160),
    ("flux1-schnell", 11_891_178_560, 776, 1156),
])
def test_released_presets_on_meta(preset: str, params: int, original_keys: int, diffusers_keys: int) -> None:
    cfg = PRESETS[preset].dit
    with meta_device():
        ours = FluxTransformer(cfg)
        theirs = diffusers.FluxTransformer2DModel.from_config(cfg.to_diffusers_json())
    assert sum(p.numel() for p in ours.parameters()) == params
    assert sum(p.numel() for p in theirs.parameters()) == params
    sd, ref = ours.state_dict(), theirs.state_dict()
    assert len(sd) == original_keys and len(ref) == diffusers_keys
    # key lists both ways, and shapes through the tensor maps (meta tensors: no memory)
    assert sorted(original_to_diffusers_keys(sd)) == sorted(ref)
    assert sorted(diffusers_to_original_keys(ref)) == sorted(sd)
    mapped = original_to_diffusers(sd)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ref.items()}
    assert {k: v.shape for k, v in diffusers_to_original(ref).items()} == {k: v.shape for k, v in sd.items()}


def test_key_map_matches_diffusers_single_file_converter() -> None:
    """diffusers' own BFL converter (it hard-codes d = 3072, so the width is the release's; one block of each
    kind) on a label checkpoint: every row of every tensor holds a distinct number, so a misplaced q/k/v row
    block, a wrong [d, d, d, 4d] split or an unswapped final modulation shows as a value mismatch."""
    cfg = FluxDiTConfig(num_double_blocks=1, num_single_blocks=1, guidance_embed=True)
    with meta_device():
        shapes = {k: v.shape for k, v in FluxTransformer(cfg).state_dict().items()}
    labels, start = {}, 0
    for key, shape in shapes.items():
        labels[key] = torch.arange(start, start + shape[0], dtype=torch.float64)[:, None]  # 1 column: rows suffice
        start += shape[0]
    prefixed = {ORIGINAL_PREFIX + k: v for k, v in labels.items()}
    expected = convert_flux_transformer_checkpoint_to_diffusers(dict(prefixed))
    ours = original_to_diffusers(prefixed)
    assert sorted(ours) == sorted(expected)
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    back = diffusers_to_original(ours)
    assert sorted(back) == sorted(labels) and all(torch.equal(back[k], labels[k]) for k in labels)


def test_key_maps_pass_unknown_keys_and_keep_incomplete_fusions_visible() -> None:
    assert original_to_diffusers_keys(["foo.bar", "double_blocks.0.img_attn.qkv.weight"]) == [
        "foo.bar", "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight",
        "transformer_blocks.0.attn.to_v.weight"]
    # to_v missing: to_q and to_k stay as they are, so the strict load names them (and the missing qkv)
    partial = ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight", "norm_out.linear.bias"]
    assert diffusers_to_original_keys(partial) == partial[:2] + ["final_layer.adaLN_modulation.1.bias"]
    sd = {k: torch.zeros(4) for k in partial}
    assert sorted(diffusers_to_original(sd)) == sorted(partial[:2] + ["final_layer.adaLN_modulation.1.bias"])


def test_keep_fp32_names(dev: FluxTransformer) -> None:
    fp32 = {n for n, _ in dev.named_parameters() if FluxTransformer.keep_fp32(n)}
    assert "time_in.in_layer.weight" in fp32 and "guidance_in.out_layer.bias" in fp32
    assert "vector_in.in_layer.weight" in fp32 and "final_layer.adaLN_modulation.1.weight" in fp32
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in fp32 and "single_blocks.1.norm.key_norm.scale" in fp32
    for matmul in ("img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight",
                   "double_blocks.1.txt_mod.lin.weight", "single_blocks.0.linear1.weight"):
        assert matmul not in fp32


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _release_inputs() -> tuple[torch.Tensor, ...]:
    latents, context, pooled = inputs(TINY_RELEASE, seed=7)
    return latents, context, pooled, torch.tensor([3.5, 2.0])


@torch.no_grad()
def test_from_pretrained_original_file(release_like, tmp_path: Path) -> None:
    """flux1-dev.safetensors at the top of a release folder, keys made from the diffusers twin's weights."""
    model, ref = release_like
    latents, context, pooled, guidance = _release_inputs()
    expected = reference_velocity(ref, latents, T, context, pooled, guidance)
    save_file(diffusers_to_original(ref.state_dict()), str(tmp_path / "flux1-dev.safetensors"))
    (tmp_path / "ae.safetensors").touch()  # the rest of a release folder is not read by the DiT
    loaded = FluxTransformer.from_pretrained(tmp_path)
    assert loaded.config == TINY_RELEASE  # inferred from the tensor shapes
    torch.testing.assert_close(loaded(latents, T, context, pooled, guidance), expected, atol=ATOL, rtol=RTOL)
    # repackaged files with the `model.diffusion_model.` prefix, given as a file
    sd = load_file(str(tmp_path / "flux1-dev.safetensors"))
    save_file({ORIGINAL_PREFIX + k: v for k, v in sd.items()}, str(tmp_path / "repacked.safetensors"))
    again = FluxTransformer.from_pretrained(tmp_path / "repacked.safetensors")
    assert torch.equal(again(latents, T, context, pooled, guidance), loaded(latents, T, context, pooled, guidance))


@torch.no_grad()
def test_from_pretrained_original_schnell_and_explicit_config(tmp_path: Path) -> None:
    model = randomise(FluxTransformer(TINY_SCHNELL), seed=8)
    save_file(model.state_dict(), str(tmp_path / "flux1-schnell.safetensors"))
    with pytest.raises(CheckpointError, match="head_dim 32 is not the release's 128.*config="):
        FluxTransformer.from_pretrained(tmp_path)
    loaded = FluxTransformer.from_pretrained(tmp_path, config=TINY_SCHNELL)
    latents, context, pooled = inputs(TINY_SCHNELL)
    assert torch.equal(loaded(latents, T, context, pooled), model(latents, T, context, pooled))
    # head_dim 128: a schnell file's config is inferred, without a guidance embedding
    release_schnell = dataclasses.replace(TINY_RELEASE, guidance_embed=False)
    path = randomise(FluxTransformer(release_schnell), seed=9).save_pretrained(tmp_path / "release")
    assert path.name == "flux1-schnell.safetensors"
    assert FluxTransformer.from_pretrained(tmp_path / "release").config == release_schnell


@pytest.mark.parametrize("sharded", [False, True])
@torch.no_grad()
def test_from_pretrained_diffusers_folder(release_like, tmp_path: Path, sharded: bool) -> None:
    """A folder written by diffusers' own save_pretrained, as a release root (transformer/) and as itself."""
    _, ref = release_like
    latents, context, pooled, guidance = _release_inputs()
    expected = reference_velocity(ref, latents, T, context, pooled, guidance)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="1MB" if sharded else "10GB")
    index = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() == sharded
    if sharded:
        assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    for path in (tmp_path, tmp_path / "transformer"):
        loaded = FluxTransformer.from_pretrained(path)
        assert loaded.config == TINY_RELEASE
        torch.testing.assert_close(loaded(latents, T, context, pooled, guidance), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("damage,key", [("remove", "single_blocks.1.linear2.weight"),
                                        ("extra", "double_blocks.0.img_attn.qkv_extra.weight"),
                                        ("shape", "double_blocks.1.txt_mlp.0.bias")])
def test_bad_original_file_names_key_and_file(release_like, tmp_path: Path, damage: str, key: str) -> None:
    model, _ = release_like
    sd = dict(model.state_dict())
    if damage == "remove":
        del sd[key]
    elif damage == "extra":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(sd[key].shape[0] + 1)
    path = tmp_path / "flux1-dev.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        FluxTransformer.from_pretrained(tmp_path)
    assert key in str(info.value) and str(path) in str(info.value)


def test_bad_diffusers_folder_names_keys_and_file(release_like, tmp_path: Path) -> None:
    _, ref = release_like
    ref.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["transformer_blocks.1.attn.add_v_proj.weight"]
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        FluxTransformer.from_pretrained(tmp_path)
    text = str(info.value)
    assert str(path) in text and "double_blocks.1.txt_attn.qkv.weight" in text  # missing (native name)
    assert "transformer_blocks.1.attn.add_q_proj.weight" in text  # left unfused: unexpected


def test_not_a_flux_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a FLUX.1 checkpoint"):
        FluxTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(CheckpointError, match="WanTransformer3DModel.*not FluxTransformer2DModel"):
        FluxTransformer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        FluxTransformer.from_pretrained(tmp_path / "absent")


@torch.no_grad()
def test_bf16_load_keeps_fp32_params_and_runs(release_like, tmp_path: Path) -> None:
    model, _ = release_like
    save_file(model.state_dict(), str(tmp_path / "flux1-dev.safetensors"))
    loaded = FluxTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        assert p.dtype == (torch.float32 if FluxTransformer.keep_fp32(name) else torch.bfloat16), name
    latents, context, pooled, guidance = _release_inputs()
    out = loaded(latents, T, context, pooled, guidance)
    expected = model(latents, T, context, pooled, guidance)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.3g}"
    assert loaded(latents.bfloat16(), T, context, pooled, guidance).dtype == torch.bfloat16
    cast = FluxTransformer(TINY_RELEASE).cast_weights(torch.bfloat16)
    assert {n: p.dtype for n, p in cast.named_parameters()} == {n: p.dtype for n, p in loaded.named_parameters()}


def test_consuming_conversion_empties_its_input_and_gives_the_same_result(release_like) -> None:
    _, ref = release_like
    sd = dict(ref.state_dict())
    expected = diffusers_to_original(sd)
    consumed = diffusers_to_original(sd, consume=True)
    assert not sd and sorted(consumed) == sorted(expected)
    assert all(torch.equal(consumed[k], expected[k]) for k in expected)


def test_public_api_is_lazy_and_names_the_classes() -> None:
    import models.flux
    from models.flux.transformer import FluxTransformer as TransformerClass

    assert models.flux.FluxTransformer is TransformerClass
    assert all(getattr(models.flux, name) is not None for name in models.flux.__all__)
    with pytest.raises(AttributeError, match=r"no attribute 'Flux'.*FluxTransformer"):
        models.flux.Flux  # noqa: B018  # the attribute access is the test


@torch.no_grad()
def test_save_pretrained_both_layouts_and_diffusers_reads_ours(release_like, tmp_path: Path) -> None:
    model, _ = release_like
    latents, context, pooled, guidance = _release_inputs()
    expected = model(latents, T, context, pooled, guidance)
    original = model.save_pretrained(tmp_path / "orig")
    assert original.name == "flux1-dev.safetensors"
    sharded = model.save_pretrained(tmp_path / "diff", layout="diffusers", max_shard_bytes=500_000)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    for path in (tmp_path / "orig", sharded):
        assert torch.equal(FluxTransformer.from_pretrained(path)(latents, T, context, pooled, guidance), expected)
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(sharded).eval()
    torch.testing.assert_close(reference_velocity(theirs, latents, T, context, pooled, guidance), expected,
                               atol=ATOL, rtol=RTOL)
    schnell = FluxTransformer(TINY_SCHNELL).save_pretrained(tmp_path / "schnell")
    assert schnell.name == "flux1-schnell.safetensors"
    with pytest.raises(ValueError, match="layout must be"):
        model.save_pretrained(tmp_path, layout="comfy")
