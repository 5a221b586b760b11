"""Flux2Transformer: parity with diffusers `Flux2Transformer2DModel`, the block protocol, the BFL <-> diffusers key
map (checked against diffusers' own single-file converter), checkpoint loading in both layouts with strict errors,
config round trips, parameter counts of the released presets on the meta device, bf16.

All on CPU in fp32 with tiny random models; every parameter is randomised (diffusers' inits leave the q/k norm
scales at one, which would hide a swapped norm). The token grid is non-square (4 x 5) so a row/column mix-up in
the token order or the position ids shows, and the RoPE split gives each of the 4 axes its own width.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.conditioning import Conditioning
from models.flux2.config import (
    FLUX2_KLEIN_DEFAULTS,
    FLUX2_LATENT,
    PRESETS,
    Flux2DiTConfig,
    get_preset,
    match_preset,
)
from models.flux2.transformer import Flux2Transformer, position_ids
from models.flux2.transformer_keys import (
    ORIGINAL_PREFIX,
    diffusers_to_original,
    diffusers_to_original_keys,
    original_to_diffusers,
    original_to_diffusers_keys,
)
from models.loading import CheckpointError, meta_device
from models.random_init import randomize_parameters

# Small shapes with a non-release RoPE split (every axis its own frequency ladder), 16 input channels; with and
# without the guidance embedding (klein has none; FLUX.2-dev's shape has one).
TINY = Flux2DiTConfig(in_channels=16, hidden_size=64, num_heads=2, num_double_blocks=2, num_single_blocks=2,
                      context_dim=24, axes_dims_rope=(4, 8, 10, 10))
TINY_GUIDED = dataclasses.replace(TINY, num_double_blocks=1, guidance_embed=True, mlp_ratio=2.0)
# head_dim 128 with the release's RoPE split: the shapes whose original files infer their config. The preset (2
# heads, 2 + 2 blocks) for parity; one head and 1 + 1 blocks for the checkpoint tests (a quarter of the bytes).
TINY_PRESET = PRESETS["flux2-tiny"].dit
TINY_RELEASE = Flux2DiTConfig(hidden_size=128, num_heads=1, num_double_blocks=1, num_single_blocks=1, context_dim=24)

# Measured max abs error vs diffusers (|out| ~ 4): 0, bitwise equal, for every config here (the same operations
# in the same order). The tolerance only leaves room for other BLAS / SDPA builds; a wrong op is >= 1e-3.
ATOL = RTOL = 1e-5

GRID = (4, 5)  # (H/16, W/16) token grid; 2 x 20 rows: the image GEMMs take the prepacked CPU path (>= 32 rows)
N = GRID[0] * GRID[1]
TEXT_LEN = 7
# t = 1000 * sigma for our model; diffusers' model gets sigma (= t / 1000) and multiplies by 1000 itself.
# These values survive that round trip exactly in fp32 (checked below), so both models see the same t.
T = torch.tensor([937.5, 250.0])


def randomise(model: Flux2Transformer, seed: int = 0) -> Flux2Transformer:
    return randomize_parameters(model, seed=seed).eval().requires_grad_(False)


def diffusers_module():
    return pytest.importorskip("diffusers")


def diffusers_twin(model: Flux2Transformer) -> torch.nn.Module:
    """diffusers `Flux2Transformer2DModel` holding the same weights (the native names are diffusers')."""
    ref = diffusers_module().Flux2Transformer2DModel.from_config(model.config.to_diffusers_json()).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def inputs(cfg: Flux2DiTConfig, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, *GRID, generator=gen),
            torch.randn(batch, TEXT_LEN, cfg.context_dim, generator=gen))


@torch.no_grad()
def reference_velocity(ref: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                       guidance: torch.Tensor | None = None) -> torch.Tensor:
    """What diffusers' Flux2KleinPipeline does around its transformer: pack, 4-axis ids, sigma = t/1000, unpack."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as Pipe

    ids, txt_ids = Pipe._prepare_latent_ids(latents), Pipe._prepare_text_ids(context)
    out = ref(hidden_states=Pipe._pack_latents(latents), encoder_hidden_states=context, timestep=t / 1000,
              img_ids=ids, txt_ids=txt_ids, guidance=guidance).sample
    return Pipe._unpack_latents_with_ids(out, ids)


@pytest.fixture(scope="module")
def tiny() -> Flux2Transformer:
    return randomise(Flux2Transformer(TINY))


@pytest.fixture(scope="module")
def release_like() -> tuple[Flux2Transformer, torch.nn.Module]:
    """A head_dim-128 model and its diffusers twin, for the checkpoint tests."""
    model = randomise(Flux2Transformer(TINY_RELEASE), seed=5)
    return model, diffusers_twin(model)


# ---------------------------------------------------------------------------------------------
# parity with diffusers
# ---------------------------------------------------------------------------------------------
def test_timesteps_survive_the_pipeline_round_trip() -> None:
    assert torch.equal(T / 1000 * 1000, T)


@torch.no_grad()
def test_parity_non_square_grid(tiny: Flux2Transformer) -> None:
    latents, context = inputs(TINY)
    ours = tiny(latents, T, context)
    theirs = reference_velocity(diffusers_twin(tiny), latents, T, context)
    assert ours.shape == latents.shape and ours.dtype == latents.dtype
    assert theirs.abs().max() > 1.0  # not a comparison of near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    # scalars apply to the whole batch, and each sample depends only on its own inputs
    torch.testing.assert_close(tiny(latents, 500.0, context), reference_velocity(
        diffusers_twin(tiny), latents, torch.tensor([500.0, 500.0]), context), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(tiny(latents[1:], T[1:], context[1:]), ours[1:], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_parity_tiny_preset_and_guidance_embedding() -> None:
    model = randomise(Flux2Transformer(TINY_PRESET), seed=2)
    latents, context = inputs(TINY_PRESET, seed=2)
    torch.testing.assert_close(model(latents, T, context), reference_velocity(diffusers_twin(model), latents, T,
                                                                              context), atol=ATOL, rtol=RTOL)
    guided = randomise(Flux2Transformer(TINY_GUIDED), seed=3)
    latents, context = inputs(TINY_GUIDED, seed=4)
    guidance = torch.tensor([4.0, 2.5])
    ours = guided(latents, T, context, guidance)
    torch.testing.assert_close(ours, reference_velocity(diffusers_twin(guided), latents, T, context, guidance),
                               atol=ATOL, rtol=RTOL)
    assert not torch.allclose(guided(latents, T, context, 1.0), ours)  # the guidance input matters


@torch.no_grad()
def test_parity_loaded_from_randomised_diffusers_weights() -> None:
    """The other direction: a diffusers model, every parameter randomised, loaded strictly into ours."""
    diffusers = diffusers_module()
    ref = randomize_parameters(diffusers.Flux2Transformer2DModel.from_config(TINY.to_diffusers_json()), seed=6).eval()
    model = Flux2Transformer(TINY).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    latents, context = inputs(TINY, seed=7)
    torch.testing.assert_close(model(latents, T, context), reference_velocity(ref, latents, T, context),
                               atol=ATOL, rtol=RTOL)


def test_bad_inputs_raise_clear_errors(tiny: Flux2Transformer) -> None:
    latents, context = inputs(TINY)
    with pytest.raises(ValueError, match="latents must be \\(B, 16, H/16, W/16\\)"):
        tiny(latents[:, :8], T, context)
    with pytest.raises(ValueError, match="context must be"):
        tiny(latents, T, context[..., :10])
    with pytest.raises(ValueError, match="t must be a scalar or have shape \\(2,\\)"):
        tiny(latents, torch.tensor([1.0, 2.0, 3.0]), context)
    with pytest.raises(ValueError, match="no guidance embedding \\(klein\\): pass guidance=None"):
        tiny(latents, T, context, 4.0)
    with pytest.raises(ValueError, match="has a guidance embedding: pass guidance"):
        Flux2Transformer(TINY_GUIDED)(*inputs(TINY_GUIDED)[:1], T, inputs(TINY_GUIDED)[1])


# ---------------------------------------------------------------------------------------------
# ids and RoPE
# ---------------------------------------------------------------------------------------------
def test_ids_and_rope_match_the_diffusers_pipeline_and_pos_embed(tiny: Flux2Transformer) -> None:
    diffusers_module()
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as Pipe

    latents, context = inputs(TINY)
    ids = position_ids(TEXT_LEN, GRID)
    assert torch.equal(ids[:TEXT_LEN], Pipe._prepare_text_ids(context)[0].float())
    assert torch.equal(ids[TEXT_LEN:], Pipe._prepare_latent_ids(latents)[0].float())
    cos, sin = tiny.rope(TEXT_LEN, GRID)
    pos_embed = Flux2PosEmbed(theta=2000, axes_dim=list(TINY.axes_dims_rope))
    txt_cos, txt_sin = pos_embed(Pipe._prepare_text_ids(context)[0])
    img_cos, img_sin = pos_embed(Pipe._prepare_latent_ids(latents)[0])
    assert torch.equal(cos.repeat_interleave(2, dim=1), torch.cat([txt_cos, img_cos]))
    assert torch.equal(sin.repeat_interleave(2, dim=1), torch.cat([txt_sin, img_sin]))


# ---------------------------------------------------------------------------------------------
# block protocol
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_block_protocol_is_the_forward(tiny: Flux2Transformer) -> None:
    latents, context = inputs(TINY)
    conditioning = [Conditioning(context[0]), Conditioning(context[1])]
    state = tiny.begin(latents, T, conditioning)
    assert state.text_len == TEXT_LEN and state.model.grid == GRID
    assert state.img.shape == (2, N, 64) and state.txt.shape == (2, TEXT_LEN, 64)
    assert state.rope[0].shape == (TEXT_LEN + N, 16)
    blocks = tiny.blocks
    assert len(blocks) == 4 and blocks[0] is tiny.transformer_blocks[0] and blocks[-1] is tiny.single_transformer_blocks[-1]
    img, txt = state.img, state.txt
    before = img.clone(), txt.clone()
    for block in blocks:
        img, txt = tiny.run_block(block, img, txt, state)
        assert img.shape == (2, N, 64) and txt.shape == (2, TEXT_LEN, 64)
    # blocks return new tensors and leave their inputs alone (a feature cache may keep them)
    assert torch.equal(state.img, before[0]) and torch.equal(state.txt, before[1])
    patches = tiny.run_head(img, state)
    assert patches.shape == (2, N, 16) and patches.dtype == torch.float32
    assert torch.equal(tiny.to_latents(patches, state), tiny(latents, T, context))
    signal = tiny.cache_signal(state, "modulated_input")
    assert signal.per_token and signal.values.shape == (2, N, 64)
    with pytest.raises(ValueError, match="no cache signal 'e'; its signals are modulated_input"):
        tiny.cache_signal(state, "e")
    with pytest.raises(ValueError, match="same length; got text lengths \\[6, 7\\]"):
        tiny.begin(latents, T, [Conditioning(context[0]), Conditioning(context[1, :6])])


@torch.no_grad()
def test_attention_seam_sees_text_first_joint_sequences(tiny: Flux2Transformer) -> None:
    from models.attention import auto_attention, sdpa_attention

    seen = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:  # noqa: ANN001
        seen.append((meta.layer, meta.kind, meta.text_len, tuple(q.shape)))
        return sdpa_attention(q, k, v, meta)

    latents, context = inputs(TINY)
    expected = tiny(latents, T, context)
    tiny.set_attention(spy)
    try:
        assert torch.equal(tiny(latents, T, context), expected)
    finally:
        tiny.set_attention(auto_attention)
    assert seen == [(layer, "joint", TEXT_LEN, (2, TEXT_LEN + N, 2, 32)) for layer in range(4)]


# ---------------------------------------------------------------------------------------------
# config, presets, parameter counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,params,diffusers_keys,original_keys", [
    ("flux2-klein-4b", 3_875_544_576, 169, 149),
    ("flux2-klein-9b", 9_078_581_248, 233, 201),
])
def test_released_presets_on_meta(preset: str, params: int, diffusers_keys: int, original_keys: int) -> None:
    diffusers = diffusers_module()
    cfg = PRESETS[preset].dit
    with meta_device():
        ours = Flux2Transformer(cfg)
        theirs = diffusers.Flux2Transformer2DModel.from_config(cfg.to_diffusers_json())
    assert sum(p.numel() for p in ours.parameters()) == params
    assert sum(p.numel() for p in theirs.parameters()) == params
    # the closed form: double 26 d^2 + 4 h, single 13 d^2 + 2 h, stem 18 d^2 + d (256 + 128 + C_txt + 128)
    d, h = cfg.hidden_size, cfg.head_dim
    assert params == (cfg.num_double_blocks * (26 * d * d + 4 * h) + cfg.num_single_blocks * (13 * d * d + 2 * h)
                      + 18 * d * d + d * (256 + 128 + cfg.context_dim + 128))
    sd, ref = ours.state_dict(), theirs.state_dict()
    assert sorted(sd) == sorted(ref) and len(sd) == diffusers_keys
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}
    original = diffusers_to_original(sd)
    assert len(original) == original_keys
    assert sorted(diffusers_to_original_keys(sd)) == sorted(original)
    assert sorted(original_to_diffusers_keys(original)) == sorted(sd)
    assert {k: v.shape for k, v in original_to_diffusers(original).items()} == {k: v.shape for k, v in sd.items()}


def test_presets_and_defaults() -> None:
    klein = get_preset("flux2-klein-4b")
    assert klein.max_sequence_length == 512 and klein.defaults == FLUX2_KLEIN_DEFAULTS
    assert klein.defaults.num_inference_steps == 4 and klein.defaults.guidance_scale is None
    assert klein.defaults.sampler == "flowmatch-euler" and (klein.defaults.height, klein.defaults.width) == (1024, 1024)
    assert abs(klein.defaults.shift.mu(4096, 4) - 2.29118) < 1e-5  # the release's mu at 1024^2, 4 steps
    assert FLUX2_LATENT.latent_shape(1, 1024, 1024) == (128, 64, 64) and FLUX2_LATENT.tokens(1, 1024, 1024) == 4096
    assert match_preset(TINY_PRESET).name == "flux2-tiny" and match_preset(TINY).name == "custom"
    assert match_preset(TINY_GUIDED).defaults.guidance_scale == 4.0
    with pytest.raises(ValueError, match="unknown FLUX.2 preset 'klein'; choose one of"):
        get_preset("klein")


def test_config_round_trips_through_config_json(tmp_path: Path) -> None:
    diffusers = diffusers_module()
    for cfg in (PRESETS["flux2-klein-4b"].dit, PRESETS["flux2-klein-9b"].dit, TINY, TINY_GUIDED):
        assert Flux2DiTConfig.from_diffusers_json(cfg.to_diffusers_json()) == cfg
        # the config.json diffusers itself writes for the same model
        with meta_device():
            ref = diffusers.Flux2Transformer2DModel.from_config(cfg.to_diffusers_json())
        ref.save_config(tmp_path)
        assert Flux2DiTConfig.from_diffusers_json(json.loads((tmp_path / "config.json").read_text())) == cfg
    # missing keys take diffusers' defaults (FLUX.2-dev's shape), as diffusers does
    dev = Flux2DiTConfig.from_diffusers_json({"_class_name": "Flux2Transformer2DModel"})
    assert (dev.num_heads, dev.num_double_blocks, dev.num_single_blocks, dev.context_dim, dev.guidance_embed) == (
        48, 8, 48, 15360, True)


@pytest.mark.parametrize("field,value,message", [
    ("patch_size", 2, "patch_size 2 is not FLUX.2's 1"),
    ("out_channels", 64, "out_channels 64 differs from in_channels 128"),
    ("eps", 1e-5, "eps 1e-05 is not the release's 1e-06"),
    ("timestep_guidance_channels", 128, "timestep_guidance_channels 128"),
    ("axes_dims_rope", [32, 32, 64], "4 axes"),
    ("axes_dims_rope", [32, 32, 32, 30], "must sum to head_dim \\(128\\)"),
])
def test_bad_config_json_names_the_field(field: str, value: object, message: str) -> None:
    cfg = {**PRESETS["flux2-klein-4b"].dit.to_diffusers_json(), field: value}
    with pytest.raises(ValueError, match=message):
        Flux2DiTConfig.from_diffusers_json(cfg)


# ---------------------------------------------------------------------------------------------
# key maps
# ---------------------------------------------------------------------------------------------
def test_key_map_matches_diffusers_single_file_converter() -> None:
    """diffusers' own BFL converter on a label checkpoint (with the guidance embedder): every row of every tensor
    holds a distinct number, so a misplaced q/k/v row block or an unswapped final modulation shows as a value
    mismatch; then back again."""
    diffusers_module()
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    with meta_device():
        shapes = {k: v.shape for k, v in diffusers_to_original(Flux2Transformer(TINY_GUIDED).state_dict()).items()}
    labels, start = {}, 0
    for key, shape in shapes.items():
        labels[key] = torch.arange(start, start + shape[0], dtype=torch.float64)[:, None]  # 1 column: rows suffice
        start += shape[0]
    assert any(k.startswith("guidance_in.") for k in labels) and any(".qkv." in k for k in labels)
    expected = convert_flux2_transformer_checkpoint_to_diffusers(dict(labels))
    ours = original_to_diffusers({ORIGINAL_PREFIX + k: v for k, v in labels.items()})
    assert sorted(ours) == sorted(expected)
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    back = diffusers_to_original(ours)
    assert sorted(back) == sorted(labels) and all(torch.equal(back[k], labels[k]) for k in labels)


def test_key_maps_pass_unknown_keys_and_keep_incomplete_fusions_visible() -> None:
    assert original_to_diffusers_keys(["foo.bar", "double_blocks.0.img_attn.qkv.weight"]) == [
        "foo.bar", "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight",
        "transformer_blocks.0.attn.to_v.weight"]
    assert original_to_diffusers_keys(["single_blocks.3.linear1.weight", "single_blocks.3.norm.key_norm.scale"]) == [
        "single_transformer_blocks.3.attn.to_qkv_mlp_proj.weight", "single_transformer_blocks.3.attn.norm_k.weight"]
    # to_v missing: to_q and to_k stay as they are, so the strict load names them (and the missing qkv)
    partial = ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight",
               "norm_out.linear.weight"]
    assert diffusers_to_original_keys(partial) == partial[:2] + ["final_layer.adaLN_modulation.1.weight"]
    sd = {k: torch.zeros(4) for k in partial}
    assert sorted(diffusers_to_original(sd)) == sorted(partial[:2] + ["final_layer.adaLN_modulation.1.weight"])
    with pytest.raises(ValueError, match="two checkpoint keys map to 'x_embedder.weight'"):
        original_to_diffusers({"img_in.weight": torch.zeros(1), ORIGINAL_PREFIX + "img_in.weight": torch.zeros(1)})


def test_keep_fp32_names(tiny: Flux2Transformer) -> None:
    fp32 = {n for n, _ in tiny.named_parameters() if Flux2Transformer.keep_fp32(n)}
    assert fp32 == {
        "time_guidance_embed.timestep_embedder.linear_1.weight", "time_guidance_embed.timestep_embedder.linear_2.weight",
        "norm_out.linear.weight", "proj_out.weight",
        *(f"transformer_blocks.{i}.attn.norm_{n}.weight" for i in range(2) for n in ("q", "k", "added_q", "added_k")),
        *(f"single_transformer_blocks.{i}.attn.norm_{n}.weight" for i in range(2) for n in ("q", "k")),
    }


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_from_pretrained_original_file(release_like, tmp_path: Path) -> None:
    """An original file (any name) at the top of a release folder next to a VAE file, BFL keys made by diffusers'
    converter's inverse from the diffusers twin's weights."""
    model, ref = release_like
    latents, context = inputs(TINY_RELEASE, seed=8)
    expected = reference_velocity(ref, latents, T, context)
    save_file(diffusers_to_original(ref.state_dict()), str(tmp_path / "flux-2-klein-tiny.safetensors"))
    save_file({"decoder.conv_in.weight": torch.zeros(2)}, str(tmp_path / "flux2-vae.safetensors"))  # not read
    loaded = Flux2Transformer.from_pretrained(tmp_path)
    assert loaded.config == TINY_RELEASE  # inferred from the tensor shapes
    torch.testing.assert_close(loaded(latents, T, context), expected, atol=ATOL, rtol=RTOL)
    # repackaged files with the `model.diffusion_model.` prefix, given as a file
    sd = load_file(str(tmp_path / "flux-2-klein-tiny.safetensors"))
    save_file({ORIGINAL_PREFIX + k: v for k, v in sd.items()}, str(tmp_path / "repacked.safetensors"))
    again = Flux2Transformer.from_pretrained(tmp_path / "repacked.safetensors")
    assert torch.equal(again(latents, T, context), loaded(latents, T, context))
    # two transformer files: the caller must name one
    with pytest.raises(CheckpointError, match="several FLUX.2 transformer files.*pass the file you mean"):
        Flux2Transformer.from_pretrained(tmp_path)


@torch.no_grad()
def test_from_pretrained_original_needs_a_config_off_the_release_head_dim(tiny: Flux2Transformer,
                                                                          tmp_path: Path) -> None:
    path = tiny.save_pretrained(tmp_path)
    assert path.name == "flux-2-transformer.safetensors"  # no released preset has this shape
    with pytest.raises(CheckpointError, match="head_dim 32 is not the release's 128.*config="):
        Flux2Transformer.from_pretrained(tmp_path)
    loaded = Flux2Transformer.from_pretrained(path, config=TINY)
    latents, context = inputs(TINY)
    assert torch.equal(loaded(latents, T, context), tiny(latents, T, context))


@pytest.mark.parametrize("sharded", [False, True])
@torch.no_grad()
def test_from_pretrained_diffusers_folder(release_like, tmp_path: Path, sharded: bool) -> None:
    """A folder written by diffusers' own save_pretrained, as a release root (transformer/) and as itself; in a
    release folder that also holds an original file, transformer/ is taken."""
    _, ref = release_like
    latents, context = inputs(TINY_RELEASE, seed=9)
    expected = reference_velocity(ref, latents, T, context)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="500KB" if sharded else "10GB")
    index = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() == sharded
    if sharded:
        assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    save_file({"double_stream_modulation_img.lin.weight": torch.zeros(2)}, str(tmp_path / "broken.safetensors"))
    for path in (tmp_path, tmp_path / "transformer"):
        loaded = Flux2Transformer.from_pretrained(path)
        assert loaded.config == TINY_RELEASE
        torch.testing.assert_close(loaded(latents, T, context), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("damage,key", [("remove", "single_blocks.0.linear2.weight"),
                                        ("extra", "double_blocks.0.img_attn.qkv_extra.weight"),
                                        ("shape", "double_blocks.0.txt_mlp.0.weight")])
def test_bad_original_file_names_its_own_key_and_the_file(release_like, tmp_path: Path, damage: str,
                                                          key: str) -> None:
    model, _ = release_like
    sd = diffusers_to_original(model.state_dict())
    if damage == "remove":
        del sd[key]
    elif damage == "extra":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    path = tmp_path / "flux-2-klein-4b.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError) as info:
        Flux2Transformer.from_pretrained(tmp_path, config=TINY_RELEASE)
    assert key in str(info.value) and str(path) in str(info.value)


def test_bad_diffusers_folder_names_keys_and_file(release_like, tmp_path: Path) -> None:
    _, ref = release_like
    ref.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["transformer_blocks.0.attn.add_v_proj.weight"]
    sd["transformer_blocks.0.attn.add_w_proj.weight"] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        Flux2Transformer.from_pretrained(tmp_path)
    text = str(info.value)
    assert str(path) in text and "missing keys: transformer_blocks.0.attn.add_v_proj.weight" in text
    assert "unexpected keys: transformer_blocks.0.attn.add_w_proj.weight" in text


def test_not_a_flux2_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a FLUX.2 checkpoint"):
        Flux2Transformer.from_pretrained(tmp_path)
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(CheckpointError, match="not a FLUX.2 checkpoint"):  # a FLUX.1 file is not taken
        Flux2Transformer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="lacks double_stream_modulation_img.lin.weight"):
        Flux2Transformer.from_pretrained(tmp_path / "flux1-dev.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="FluxTransformer2DModel.*not Flux2Transformer2DModel"):
        Flux2Transformer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        Flux2Transformer.from_pretrained(tmp_path / "absent")


@torch.no_grad()
def test_bf16_load_keeps_fp32_params_and_runs(release_like, tmp_path: Path) -> None:
    model, _ = release_like
    folder = model.save_pretrained(tmp_path, layout="diffusers")
    loaded = Flux2Transformer.from_pretrained(folder, dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        assert p.dtype == (torch.float32 if Flux2Transformer.keep_fp32(name) else torch.bfloat16), name
    latents, context = inputs(TINY_RELEASE, seed=10)
    out = loaded(latents, T, context)
    expected = model(latents, T, context)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.3g}"
    assert loaded(latents.bfloat16(), T, context).dtype == torch.bfloat16
    cast = Flux2Transformer(TINY_RELEASE).cast_weights(torch.bfloat16)
    assert {n: p.dtype for n, p in cast.named_parameters()} == {n: p.dtype for n, p in loaded.named_parameters()}


@torch.no_grad()
def test_save_pretrained_both_layouts_and_diffusers_reads_ours(release_like, tmp_path: Path) -> None:
    model, _ = release_like
    latents, context = inputs(TINY_RELEASE, seed=11)
    expected = model(latents, T, context)
    original = model.save_pretrained(tmp_path / "orig", filename="flux-2-klein-4b.safetensors")
    assert original.name == "flux-2-klein-4b.safetensors"
    sharded = model.save_pretrained(tmp_path / "diff", layout="diffusers", max_shard_bytes=500_000)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    for path in (tmp_path / "orig", original, sharded):
        assert torch.equal(Flux2Transformer.from_pretrained(path)(latents, T, context), expected)
    theirs = diffusers_module().Flux2Transformer2DModel.from_pretrained(sharded).eval()
    torch.testing.assert_close(reference_velocity(theirs, latents, T, context), expected, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="layout must be"):
        model.save_pretrained(tmp_path, layout="comfy")


def test_public_api_is_lazy_and_names_the_classes() -> None:
    import models.flux2
    from models.flux2.transformer import Flux2Transformer as TransformerClass

    assert models.flux2.Flux2Transformer is TransformerClass
    assert models.flux2._LAZY["Flux2VAE"] == "models.flux2.vae"
    assert models.flux2._LAZY["Flux2TextEncoder"] == "models.flux2.text_encoder"
    with pytest.raises(AttributeError, match=r"no attribute 'Flux2'.*Flux2Transformer"):
        models.flux2.Flux2  # noqa: B018  # the attribute access is the test
