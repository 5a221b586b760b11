"""WanTransformer: parity with diffusers `WanTransformer3DModel`, key maps, checkpoint I/O, precision policy.

All on CPU in fp32 with small random models; every parameter is randomised (Wan zero-initialises
`head.head.weight`, which would hide head bugs), norms around 1 + 0.1 * randn.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import cpu_linear
from models.attention import AttentionMeta, sdpa_attention
from models.loading import CheckpointError, meta_device
from models.wan.config import PRESETS, WanDiTConfig
from models.random_init import randomize_parameters
from models.wan.transformer import (
    PackedLinear,
    WanTransformer,
    apply_rope,
    rope_pairs,
    rope_tables,
    timestep_sinusoid,
)
from models.wan.transformer_keys import ORIGINAL_PREFIX, diffusers_to_original, original_to_diffusers

diffusers = pytest.importorskip("diffusers")

# head_dim 32 gives RoPE pairs (6, 5, 5), so all three axes are exercised.
TINY = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=48, text_len=24)
# The Wan2.1-14B / Wan2.2-A14B expert layout scaled down: head_dim 128 (pairs 22/21/21), freq_dim 256,
# ffn/dim = 13824/5120 = 2.7.
A14B_LIKE = WanDiTConfig(dim=384, ffn_dim=1037, num_heads=3, num_layers=2, freq_dim=256, text_dim=64, text_len=32)

# Measured max abs error vs diffusers: 1.1e-5 (TINY, |out| 4.8) and 1.4e-5 (A14B_LIKE, |out| 3.8). The gap is
# Wan's float64 sinusoid and RoPE against diffusers' float32 ones (measured 2.8e-5 for Wan's own WanModel).
ATOL = RTOL = 1e-4


def randomise(model: WanTransformer, seed: int = 0) -> WanTransformer:
    """Random values for every parameter (Wan's init zeroes head.head.weight, which would hide head bugs)."""
    return randomize_parameters(model, seed=seed).eval().requires_grad_(False)


def diffusers_twin(model: WanTransformer) -> torch.nn.Module:
    """diffusers `WanTransformer3DModel` holding the same weights, through `original_to_diffusers`."""
    ref = diffusers.WanTransformer3DModel.from_config(model.config.to_diffusers_json()).eval()
    ref.load_state_dict(original_to_diffusers(model.state_dict()), strict=True)
    return ref


def inputs(cfg: WanDiTConfig, lengths: tuple[int, ...] = (7, 24), latent: tuple[int, int, int] = (3, 8, 12),
           seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Latents (B, 16, F, H, W), unpadded prompts [(L_i, text_dim)] and the same prompts zero-padded to text_len."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), cfg.in_dim, *latent, generator=gen)
    prompts = [torch.randn(n, cfg.text_dim, generator=gen) for n in lengths]
    padded = torch.zeros(len(lengths), cfg.text_len, cfg.text_dim)
    for i, p in enumerate(prompts):
        padded[i, : p.shape[0]] = p
    return x, prompts, padded


@pytest.fixture(scope="module")
def tiny() -> WanTransformer:
    return randomise(WanTransformer(TINY))


# ---------------------------------------------------------------------------------------------
# parity with diffusers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_parity_tiny_batch_with_different_text_lengths_and_timesteps(tiny: WanTransformer) -> None:
    ref = diffusers_twin(tiny)
    x, prompts, padded = inputs(TINY, lengths=(7, 24))
    t = torch.tensor([999, 37])  # int timesteps, as the original pipeline passes them
    ours = tiny(x, t, prompts)
    theirs = ref(x, t, padded).sample
    assert ours.shape == x.shape and ours.dtype == x.dtype
    assert theirs.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    # a padded (B, L, text_dim) tensor gives the same as the unpadded list
    torch.testing.assert_close(tiny(x, t, padded[:, :24]), ours, atol=0, rtol=0)
    # float timesteps (what the samplers pass)
    t_float = torch.tensor([812.5, 3.25])
    torch.testing.assert_close(tiny(x, t_float, prompts), ref(x, t_float, padded).sample, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_parity_a14b_layout_with_per_sample_timesteps() -> None:
    model = randomise(WanTransformer(A14B_LIKE), seed=3)
    ref = diffusers_twin(model)
    x, prompts, padded = inputs(A14B_LIKE, lengths=(32, 5), latent=(2, 6, 4), seed=4)
    t = torch.tensor([875.0, 120.0])
    ours = model(x, t, prompts)
    # Wan2.2's model.py expands t to one value per token (B, L); diffusers has the same path.
    tokens = 2 * 3 * 2
    per_token = ref(x, t[:, None].expand(2, tokens), padded).sample
    per_sample = ref(x, t, padded).sample
    assert per_token.abs().max() > 1.0
    torch.testing.assert_close(ours, per_token, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours, per_sample, atol=ATOL, rtol=RTOL)
    # each sample depends only on its own timestep and prompt
    single = model(x[1:], t[1:], prompts[1:])
    torch.testing.assert_close(single, ours[1:], atol=1e-5, rtol=1e-5)


def test_sinusoid_is_cos_first_float64() -> None:
    t = torch.tensor([0, 999])
    emb = timestep_sinusoid(t, 8)
    assert emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.pow(10000.0, -torch.arange(4, dtype=torch.float64) / 4)
    assert torch.equal(emb[1, :4], torch.cos(999 * freqs).float())


def test_rope_matches_wan_complex_reference() -> None:
    """Wan's rope_params / rope_apply, written out in complex128, against our real tables."""
    head_dim, grid = 32, (3, 4, 5)
    assert rope_pairs(head_dim) == (6, 5, 5) and rope_pairs(128) == (22, 21, 21)
    d = head_dim

    def rope_params(dim: int) -> torch.Tensor:
        freqs = torch.outer(torch.arange(1024), 1.0 / torch.pow(10000, torch.arange(0, dim, 2).double().div(dim)))
        return torch.polar(torch.ones_like(freqs), freqs)

    table = torch.cat([rope_params(d - 4 * (d // 6)), rope_params(2 * (d // 6)), rope_params(2 * (d // 6))], dim=1)
    c = d // 2
    ft, fh, fw = table.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    freqs = torch.cat([ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1), fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    x = torch.randn(2, f * h * w, 3, d)
    expected = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, f * h * w, 3, -1, 2)) * freqs)
    got = apply_rope(x, rope_tables(grid, head_dim))
    torch.testing.assert_close(got, expected.flatten(3).float(), atol=2e-6, rtol=1e-6)
    # rows are tokens: a rank's slice of the table rotates its slice of the tokens
    cos, sin = rope_tables(grid, head_dim)
    torch.testing.assert_close(apply_rope(x[:, 20:40], (cos[20:40], sin[20:40])), got[:, 20:40], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# key maps and parameter counts
# ---------------------------------------------------------------------------------------------
def test_key_map_round_trip_equals_diffusers_key_set(tiny: WanTransformer) -> None:
    ours = tiny.state_dict()
    theirs = diffusers.WanTransformer3DModel.from_config(TINY.to_diffusers_json()).state_dict()
    mapped = original_to_diffusers(ours)
    assert set(mapped) == set(theirs)
    assert all(mapped[k].shape == theirs[k].shape for k in theirs)
    back = diffusers_to_original(mapped)
    assert set(back) == set(ours) and all(back[k] is ours[k] for k in ours)
    # the norm2/norm3 swap: our affine cross-attention norm3 is diffusers' norm2
    assert mapped["blocks.1.norm2.weight"] is ours["blocks.1.norm3.weight"]
    prefixed = {ORIGINAL_PREFIX + k: v for k, v in ours.items()}
    assert set(original_to_diffusers(prefixed)) == set(theirs)
    assert set(diffusers_to_original(prefixed)) == set(ours)
    # unknown keys pass through so the strict load reports them
    assert original_to_diffusers({"blocks.0.modulation_extra": 1, "foo.bar": 2}) == {
        "blocks.0.modulation_extra": 1, "foo.bar": 2}


def test_parameter_names_are_the_original_wan_keys(tiny: WanTransformer) -> None:
    names = {n for n, _ in tiny.named_parameters()}
    assert names == set(tiny.state_dict())
    for key in ("patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias",
                "time_embedding.0.bias", "time_embedding.2.weight", "time_projection.1.weight",
                "blocks.1.modulation", "blocks.0.self_attn.q.bias", "blocks.0.self_attn.norm_k.weight",
                "blocks.0.norm3.bias", "blocks.0.cross_attn.o.weight", "blocks.0.cross_attn.norm_q.weight",
                "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias", "head.modulation", "head.head.weight"):
        assert key in names, key


@pytest.mark.parametrize("preset,params,keys", [("wan2.1-t2v-1.3b", 1_418_996_800, 825),
                                                ("wan2.1-t2v-14b", 14_288_491_584, 1095)])
def test_preset_parameter_counts_on_meta(preset: str, params: int, keys: int) -> None:
    with meta_device():
        model = WanTransformer(PRESETS[preset].dit)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_keep_fp32_names() -> None:
    fp32 = ["time_embedding.0.weight", "time_projection.1.bias", "blocks.3.modulation", "blocks.3.norm3.weight",
            "blocks.3.self_attn.norm_q.weight", "blocks.3.cross_attn.norm_k.weight", "head.modulation",
            "head.head.weight"]
    matmul = ["patch_embedding.weight", "text_embedding.0.weight", "blocks.3.self_attn.q.weight",
              "blocks.3.cross_attn.o.bias", "blocks.3.ffn.0.weight"]
    assert all(WanTransformer.keep_fp32(n) for n in fp32)
    assert not any(WanTransformer.keep_fp32(n) for n in matmul)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_from_pretrained_both_layouts_and_sharded(tiny: WanTransformer, tmp_path) -> None:
    x, prompts, padded = inputs(TINY)
    t = torch.tensor([500, 20])
    expected = tiny(x, t, prompts)
    tiny.save_pretrained(tmp_path / "original")
    tiny.save_pretrained(tmp_path / "sharded", max_shard_bytes=40_000)
    tiny.save_pretrained(tmp_path / "diffusers", layout="diffusers")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert json.loads((tmp_path / "diffusers" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    for name in ("original", "sharded", "diffusers"):
        loaded = WanTransformer.from_pretrained(tmp_path / name)
        assert loaded.config == TINY
        assert torch.equal(loaded(x, t, prompts), expected), name
    # diffusers itself reads the diffusers layout we write (its from_pretrained needs accelerate, so load by hand)
    raw = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    ref = diffusers.WanTransformer3DModel.from_config(raw).eval()
    ref.load_state_dict(load_file(str(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")), strict=True)
    torch.testing.assert_close(ref(x, t, padded).sample, expected, atol=ATOL, rtol=RTOL)
    # original files with the `model.diffusion_model.` prefix load too
    sd = load_file(str(tmp_path / "original" / "diffusion_pytorch_model.safetensors"))
    save_file({ORIGINAL_PREFIX + k: v for k, v in sd.items()},
              str(tmp_path / "original" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(WanTransformer.from_pretrained(tmp_path / "original")(x, t, prompts), expected)


@pytest.mark.parametrize("damage,key", [("remove", "blocks.1.self_attn.k.weight"),
                                        ("extra", "blocks.1.self_attn.q_img.weight"),
                                        ("shape", "blocks.0.ffn.0.bias")])
def test_bad_checkpoint_names_key_and_file(tiny: WanTransformer, tmp_path, damage: str, key: str) -> None:
    tiny.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    if damage == "remove":
        del sd[key]
    elif damage == "extra":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(sd[key].shape[0] + 1)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        WanTransformer.from_pretrained(tmp_path)
    assert key in str(info.value) and str(path) in str(info.value)


def test_not_a_wan_config_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="FluxTransformer2DModel.*not a Wan"):
        WanTransformer.from_pretrained(tmp_path)


@torch.no_grad()
def test_bf16_load_keeps_fp32_params_and_runs(tiny: WanTransformer, tmp_path) -> None:
    tiny.save_pretrained(tmp_path)
    model = WanTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if WanTransformer.keep_fp32(name) else torch.bfloat16), name
    x, prompts, _ = inputs(TINY)
    t = torch.tensor([999, 300])
    out = model(x, t, prompts)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    expected = tiny(x, t, prompts)
    rel = (out - expected).norm() / expected.norm()
    assert rel < 0.05, f"bf16 relative error {rel:.3g}"
    assert model(x.bfloat16(), t, prompts).dtype == torch.bfloat16
    # cast_weights gives the same placement as loading in bf16
    cast = randomise(WanTransformer(TINY)).cast_weights(torch.bfloat16)
    assert {n: p.dtype for n, p in cast.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# inputs, seams, fusion
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(tiny: WanTransformer) -> None:
    x, prompts, _ = inputs(TINY)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="more than text_len=24"):
        tiny(x, t, [prompts[0], torch.randn(25, TINY.text_dim)])
    with pytest.raises(ValueError, match="more than text_len=24"):
        tiny(x, t, torch.randn(2, 30, TINY.text_dim))
    with pytest.raises(ValueError, match="divisible by the patch size"):
        tiny(x[..., :7], t, prompts)
    with pytest.raises(ValueError, match="t must be"):
        tiny(x, torch.tensor([1, 2, 3]), prompts)
    with pytest.raises(ValueError, match="context must be"):
        tiny(x, t, prompts[:1])


@torch.no_grad()
def test_block_protocol_leaves_its_input_alone(tiny: WanTransformer) -> None:
    """prepare -> blocks -> finalize is forward, and a block returns a new tensor (caches keep its input)."""
    x, prompts, _ = inputs(TINY)
    t = torch.tensor([900, 100])
    state = tiny.prepare(x, t, prompts)
    assert state.x.shape == (2, 3 * 4 * 6, TINY.dim) and state.x.dtype == torch.float32
    assert state.e0.shape == (2, 6, TINY.dim) and state.context.shape == (2, TINY.text_len, TINY.dim)
    assert state.rope[0].shape == (3 * 4 * 6, TINY.head_dim // 2) and state.grid == (3, 4, 6)
    h = state.x
    for block in tiny.blocks:
        before = h.clone()
        out = block(h, state.e0, state.context, state.rope)
        assert torch.equal(h, before) and out.data_ptr() != h.data_ptr()
        h = out
    torch.testing.assert_close(tiny.finalize(h, state), tiny(x, t, prompts), atol=0, rtol=0)


@torch.no_grad()
def test_self_attention_goes_through_the_seam(tiny: WanTransformer) -> None:
    calls: list[tuple] = []

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        calls.append((meta.layer, meta.kind, tuple(q.shape), k.shape[1]))
        return sdpa_attention(q, k, v, meta)

    x, prompts, _ = inputs(TINY)
    t = torch.tensor([10, 20])
    expected = tiny(x, t, prompts)
    original = tiny.blocks[0].self_attn.attn_fn
    tiny.set_attention(recording)
    try:
        assert torch.equal(tiny(x, t, prompts), expected)
    finally:
        tiny.set_attention(original)
    # Per block: self-attention over the video tokens, then cross-attention to the text_len text rows.
    tokens = 3 * 4 * 6
    assert calls == [call for layer in range(TINY.num_layers)
                     for call in ((layer, "self", (2, tokens, 2, 32), tokens),
                                  (layer, "cross", (2, tokens, 2, 32), TINY.text_len))]


def test_autograd_path_matches_inference_path(tiny: WanTransformer) -> None:
    """With autograd on, the FFN uses F.linear + F.gelu instead of the fused oneDNN GEMM+GELU kernel."""
    x, prompts, _ = inputs(TINY)
    t = torch.tensor([700, 5])
    with torch.no_grad():
        expected = tiny(x, t, prompts)
    tiny.requires_grad_(True)
    try:
        out = tiny(x, t, prompts)
    finally:
        tiny.requires_grad_(False)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)


def test_backward_matches_diffusers_gradients(tiny: WanTransformer) -> None:
    """Training (models.wan.tiny.train) runs the backward: every gradient equals diffusers' for the same loss."""
    model = copy.deepcopy(tiny).requires_grad_(True)
    ref = diffusers_twin(model).requires_grad_(True)
    x, prompts, padded = inputs(TINY)
    t = torch.tensor([700.0, 5.0])
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    model(x, t, prompts).sub(target).square().mean().backward()
    ref(x, t, padded).sample.sub(target).square().mean().backward()
    ours = {n: p.grad for n, p in model.named_parameters()}
    theirs = diffusers_to_original({n: p.grad for n, p in ref.named_parameters()})
    assert ours.keys() == theirs.keys() and all(g is not None and g.abs().max() > 0 for g in ours.values())
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name].view_as(grad), atol=1e-5, rtol=1e-3, msg=name)


# ---------------------------------------------------------------------------------------------
# CPU weight prepacking
# ---------------------------------------------------------------------------------------------
def packed_layers(model: WanTransformer) -> dict[str, str]:
    """name -> kind ("onednn"/"mkl") of every PackedLinear currently holding a packed weight."""
    return {n: m._packed.kind for n, m in model.named_modules() if isinstance(m, PackedLinear) and m._packed}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_packed_path_matches_plain_path(dtype: torch.dtype) -> None:
    model = randomise(WanTransformer(A14B_LIKE), seed=5).cast_weights(dtype)
    plain = copy.deepcopy(model).set_weight_prepacking(False)
    x, prompts, _ = inputs(A14B_LIKE, lengths=(32, 5), latent=(2, 6, 8), seed=6)
    t = torch.tensor([640.0, 90.0])
    out = model(x, t, prompts)
    packed = packed_layers(model)
    if not packed:
        pytest.skip("this torch build has no oneDNN/MKL prepacking ops")
    if dtype == torch.bfloat16 and not cpu_linear._ONEDNN_BF16:
        pytest.skip("this CPU has no bf16 GEMM units (oneDNN reports no bf16 support): bf16 weights are not packed")
    # every GEMM with >= 32 rows is packed: the 4 + 4 attention projections and the 2 FFN layers per block,
    # the text MLP and the head (fp32, so packed in both runs); the time MLPs (2 rows) are not
    assert len(packed) == 10 * A14B_LIKE.num_layers + 3 and not any(n.startswith("time_") for n in packed)
    assert packed["blocks.0.ffn.0"] == "onednn" and packed["head.head"] == "mkl"
    assert packed["blocks.0.self_attn.q"] == ("onednn" if dtype == torch.bfloat16 else "mkl")
    assert not packed_layers(plain)
    expected = plain(x, t, prompts)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:  # the same bf16 GEMMs with another accumulation order: bf16 rounding differences only
        assert (out - expected).norm() / expected.norm() < 1e-2
        torch.testing.assert_close(out, expected, atol=0.1, rtol=0.05)
    # a second call reuses the packs
    before = {n: m._packed.weight for n, m in model.named_modules() if isinstance(m, PackedLinear) and m._packed}
    assert torch.equal(model(x, t, prompts), out)
    assert all(m._packed.weight is before[n] for n, m in model.named_modules() if n in before)


@torch.no_grad()
def test_packing_leaves_state_dict_and_checkpoints_alone(tmp_path) -> None:
    model = randomise(WanTransformer(TINY), seed=7)
    reference = copy.deepcopy(model).set_weight_prepacking(False)
    x, prompts, _ = inputs(TINY)
    t = torch.tensor([321, 654])
    out = model(x, t, prompts)
    assert packed_layers(model), "nothing was packed"
    sd = model.state_dict()
    assert list(sd) == list(reference.state_dict())
    assert all(v.layout == torch.strided and torch.equal(v, reference.state_dict()[k]) for k, v in sd.items())
    assert [n for n, _ in model.named_parameters()] == list(sd) and not list(model.named_buffers())
    model.save_pretrained(tmp_path / "packed")
    reference.save_pretrained(tmp_path / "plain")
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        assert (tmp_path / "packed" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    torch.testing.assert_close(WanTransformer.from_pretrained(tmp_path / "packed")(x, t, prompts), out,
                               atol=1e-5, rtol=1e-5)
    # pickling and deepcopy drop the opaque packed tensors (they are rebuilt on use)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert not packed_layers(clone)
        torch.testing.assert_close(clone(x, t, prompts), out, atol=0, rtol=0)


@torch.no_grad()
def test_packs_follow_weight_changes() -> None:
    model = randomise(WanTransformer(TINY), seed=8)
    x, prompts, _ = inputs(TINY)
    t = torch.tensor([500, 50])
    model(x, t, prompts)
    if not packed_layers(model):
        pytest.skip("this torch build has no oneDNN/MKL prepacking ops")
    # an in-place write through the parameter (as load_state_dict does) invalidates the pack
    model.blocks[0].ffn[2].weight.mul_(1.5)
    model.load_state_dict(randomise(WanTransformer(TINY), seed=9).state_dict())
    expected = copy.deepcopy(model).set_weight_prepacking(False)(x, t, prompts)
    torch.testing.assert_close(model(x, t, prompts), expected, atol=1e-5, rtol=1e-5)
    # cast_weights and .to() drop the packs; the bf16 forward packs again from the bf16 weights
    model.cast_weights(torch.bfloat16)
    assert not packed_layers(model)
    model(x, t, prompts)
    if cpu_linear._ONEDNN_BF16:  # a CPU without bf16 GEMM units runs bf16 weights unpacked
        assert packed_layers(model)["blocks.1.self_attn.o"] == "onednn"
    model.to(torch.float32)
    assert not packed_layers(model)
    # the fp32 MKL packs are made for one row count: a batch of 1 after a batch of 2 re-packs them
    plain = copy.deepcopy(model).set_weight_prepacking(False)
    torch.testing.assert_close(model(x, t, prompts), plain(x, t, prompts), atol=1e-5, rtol=1e-5)
    assert model.blocks[0].self_attn.q._packed.rows == 2 * 3 * 4 * 6
    torch.testing.assert_close(model(x[:1], t[:1], prompts[:1]), plain(x[:1], t[:1], prompts[:1]),
                               atol=1e-5, rtol=1e-5)
    assert model.blocks[0].self_attn.q._packed.rows == 3 * 4 * 6


@torch.no_grad()
def test_builds_without_the_packing_ops_use_plain_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build without oneDNN/MKL (e.g. CUDA-only or ARM) falls back to F.linear (+ F.gelu)."""
    model = randomise(WanTransformer(TINY), seed=10)
    x, prompts, _ = inputs(TINY)
    t = torch.tensor([800, 200])
    expected = model(x, t, prompts)
    model.release_packed_weights()
    for name in ("_ONEDNN_LINEAR", "_ONEDNN_PACK", "_MKL_LINEAR", "_MKL_PACK"):
        monkeypatch.setattr(cpu_linear, name, None)
    monkeypatch.setattr(cpu_linear, "_ONEDNN_BF16", False)
    torch.testing.assert_close(model(x, t, prompts), expected, atol=1e-5, rtol=1e-5)
    assert not packed_layers(model)
