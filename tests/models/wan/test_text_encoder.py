"""WanTextEncoder: parity with Wan's T5 math, Wan's tokenisation conventions, both checkpoint layouts.

The reference below is written from Wan's `wan/modules/t5.py` on Wan key names and
shares no code with transformers, so a wrong key map, a missing mask or a scaling mistake shows up
as a numerical mismatch. Tiny config: dim 64, 4 heads, 3 layers, FFN 96, vocab 300, CPU fp32.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from models.loading import CheckpointError
from models.wan.t5_keys import transformers_to_wan_t5, umt5_config_from_wan_state_dict, wan_t5_to_transformers
from models.wan.text_encoder import (
    ORIGINAL_TOKENIZER,
    ORIGINAL_WEIGHTS,
    WanTextEncoder,
    clean_prompt,
)
from models.wan.tokenizer import build_word_tokenizer

DIM, HEADS, LAYERS, FFN, VOCAB = 64, 4, 3, 96, 300
TEXT_LEN = 512
EPS = 1e-6
# Max abs error on valid tokens, fp32 (Wan's encoder against UMT5EncoderModel measured 2.7e-6 / 9.5e-6 at |out| <= 4.2).
PARITY_ATOL = 2e-5

WORDS = [f"w{i}" for i in range(280)] + [".", ",", "!", "&", "<", ">", "café", "a", "b", "c"]


# ---------------------------------------------------------------- independent reference (Wan's T5 encoder)
def ref_relative_bucket(rel_pos: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Wan `T5RelativeEmbedding._relative_position_bucket`, bidirectional: rel_pos = key - query."""
    half = num_buckets // 2
    side = (rel_pos > 0).long() * half  # keys to the right use the upper half of the buckets
    dist = rel_pos.abs()
    exact = half // 2
    log_part = torch.log(dist.float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = torch.clamp(exact + log_part.long(), max=half - 1)
    return side + torch.where(dist < exact, dist, far)


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + EPS))


def ref_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def ref_wan_t5_forward(sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan T5Encoder forward on Wan key names. ids, mask: (B, L) -> (B, L, DIM)."""
    x = sd["token_embedding.weight"][ids]
    b, length, _ = x.shape
    positions = torch.arange(length)
    buckets = ref_relative_bucket(positions[None, :] - positions[:, None])  # (Lq, Lk)
    for i in range(LAYERS):
        p = f"blocks.{i}."
        h = ref_rms_norm(x, sd[p + "norm1.weight"])
        q, k, v = (F_linear(h, sd[p + f"attn.{n}.weight"]).view(b, length, HEADS, -1) for n in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1).unsqueeze(0)  # (1, N, Lq, Lk)
        bias = bias.repeat(b, 1, 1, 1)
        bias.masked_fill_(mask.view(b, 1, 1, length) == 0, torch.finfo(x.dtype).min)
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(d) in T5
        attn = torch.softmax(logits.float(), dim=-1).type_as(logits)
        out = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1)
        x = x + F_linear(out, sd[p + "attn.o.weight"])
        h = ref_rms_norm(x, sd[p + "norm2.weight"])
        ffn = F_linear(h, sd[p + "ffn.fc1.weight"]) * ref_gelu_tanh(F_linear(h, sd[p + "ffn.gate.0.weight"]))
        x = x + F_linear(ffn, sd[p + "ffn.fc2.weight"])
    return ref_rms_norm(x, sd["norm.weight"])


def F_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


def random_wan_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random, norms around 1, in Wan key names."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {"token_embedding.weight": randn(VOCAB, DIM), "norm.weight": 1 + randn(DIM, scale=0.1)}
    for i in range(LAYERS):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = 1 + randn(DIM, scale=0.1)
        sd[p + "norm2.weight"] = 1 + randn(DIM, scale=0.1)
        for n in "qkvo":
            sd[p + f"attn.{n}.weight"] = randn(DIM, DIM, scale=DIM**-0.5)
        sd[p + "pos_embedding.embedding.weight"] = randn(32, HEADS)
        sd[p + "ffn.gate.0.weight"] = randn(FFN, DIM, scale=DIM**-0.5)
        sd[p + "ffn.fc1.weight"] = randn(FFN, DIM, scale=DIM**-0.5)
        sd[p + "ffn.fc2.weight"] = randn(DIM, FFN, scale=FFN**-0.5)
    return sd


def prompt_of(n_words: int, offset: int = 0) -> str:
    return " ".join(f"w{(offset + i) % 280}" for i in range(n_words))


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def wan_sd() -> dict[str, torch.Tensor]:
    return random_wan_state_dict()


@pytest.fixture(scope="module")
def original_root(tmp_path_factory: pytest.TempPathFactory, wan_sd: dict[str, torch.Tensor]) -> Path:
    """A checkpoint root in the original release layout, written by hand (not by save_pretrained)."""
    root = tmp_path_factory.mktemp("wan_original")
    torch.save(wan_sd, root / ORIGINAL_WEIGHTS)
    build_word_tokenizer(WORDS, root / ORIGINAL_TOKENIZER)
    return root


@pytest.fixture(scope="module")
def encoder(original_root: Path) -> WanTextEncoder:
    return WanTextEncoder.from_pretrained(original_root, text_len=TEXT_LEN)


# ---------------------------------------------------------------- parity with Wan's math
def test_reference_bucket_function_known_values() -> None:
    rel = torch.tensor([0, 1, 7, 8, 127, 128, 1000, -1, -7, -8, -128, -1000])
    expected = [0, 17, 23, 24, 31, 31, 31, 1, 7, 8, 15, 15]
    assert ref_relative_bucket(rel).tolist() == expected


def test_matches_reference_wan_t5_math(encoder: WanTextEncoder, wan_sd: dict[str, torch.Tensor]) -> None:
    prompts = [prompt_of(12), prompt_of(299, offset=7)]  # 13 and 300 tokens with EOS
    ids, mask = encoder.tokenize(prompts)
    assert ids.shape == (2, TEXT_LEN)
    assert mask.sum(dim=1).tolist() == [13, 300]

    out = encoder.encode(prompts)
    with torch.no_grad():
        ref = ref_wan_t5_forward(wan_sd, ids, mask)
    for got, want, n in zip(out, ref, (13, 300)):
        assert got.shape == (n, DIM) and got.dtype == torch.float32
        err = (got - want[:n]).abs().max().item()
        assert err < PARITY_ATOL, f"max abs error {err:.2e} on {n} valid tokens (|out| max {want[:n].abs().max():.2f})"


def test_padding_does_not_change_valid_tokens(encoder: WanTextEncoder) -> None:
    """Pad keys are masked: a prompt encoded at text_len 512 and at 32 gives the same rows."""
    short = WanTextEncoder(encoder.model, encoder.tokenizer, text_len=32)
    prompt = [prompt_of(20)]
    torch.testing.assert_close(encoder.encode(prompt)[0], short.encode(prompt)[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- tokenisation, cleaning, lengths
def test_encode_lengths_count_eos_and_truncate(encoder: WanTextEncoder) -> None:
    prompts = [prompt_of(5), "", "W1 unknownword w2", prompt_of(700)]
    out = encoder.encode(prompts)
    assert [t.shape[0] for t in out] == [6, 1, 4, TEXT_LEN]
    ids, mask = encoder.tokenize(prompts)
    assert ids[0, :6].tolist()[-1] == 1 and ids[0, 6:].eq(0).all()  # EOS then pads
    assert ids[2, :4].tolist() == [ids[0, 1].item(), 2, ids[0, 2].item(), 1]  # lowercased, unk = 2
    assert ids[3, -1].item() == 1  # truncation keeps EOS
    assert encoder.encode([]) == []
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode("w1 w2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  w1 \n\t  w2   w3 ", "w1 w2 w3"),
        ("a &amp;amp; b", "a & b"),  # double-escaped entity, unescaped twice
        ("&lt;b&gt;", "<b>"),
        ("cafÃ©", "café"),  # UTF-8 read as Latin-1, repaired by ftfy
    ],
)
def test_clean_prompt(raw: str, clean: str) -> None:
    assert clean_prompt(raw) == clean


def test_encode_cleans_prompts(encoder: WanTextEncoder) -> None:
    messy, tidy = encoder.encode(["  W1\n\n w2 &amp;amp; cafÃ© ", "w1 w2 & café"])
    assert messy.shape == (5, DIM)
    assert torch.equal(messy, tidy)


# ---------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_save_and_load_round_trip(encoder: WanTextEncoder, tmp_path: Path, layout: str) -> None:
    # A small shard limit makes the diffusers layout sharded, exercising the index path.
    encoder.save_pretrained(tmp_path, layout=layout, max_shard_bytes=40_000)  # type: ignore[arg-type]
    if layout == "original":
        assert (tmp_path / ORIGINAL_WEIGHTS).is_file() and (tmp_path / "google/umt5-xxl/tokenizer.json").is_file()
        assert set(torch.load(tmp_path / ORIGINAL_WEIGHTS, weights_only=True)) == set(encoder.wan_state_dict())
    else:
        assert (tmp_path / "text_encoder/config.json").is_file()
        assert (tmp_path / "text_encoder/model.safetensors.index.json").is_file()
        assert (tmp_path / "tokenizer/tokenizer.json").is_file()
    loaded = WanTextEncoder.from_pretrained(tmp_path, text_len=TEXT_LEN)
    assert loaded.model.shared.weight is loaded.model.encoder.embed_tokens.weight
    prompts = [prompt_of(12), prompt_of(40, offset=3)]
    for a, b in zip(encoder.encode(prompts), loaded.encode(prompts)):
        assert torch.equal(a, b)


def test_save_refuses_an_untied_embedding(original_root: Path, tmp_path: Path) -> None:
    enc = WanTextEncoder.from_pretrained(original_root, text_len=16)
    enc.model.encoder.embed_tokens = torch.nn.Embedding(VOCAB, DIM)
    with pytest.raises(ValueError, match="differ"):
        enc.save_pretrained(tmp_path)


def test_from_files_accepts_single_safetensors_in_transformers_names(
    encoder: WanTextEncoder, original_root: Path, tmp_path: Path
) -> None:
    """transformers' own save_pretrained writes only shared.weight; the tie is restored on load."""
    sd = {k: v.contiguous() for k, v in encoder.model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd, str(tmp_path / "weights.safetensors"))
    loaded = WanTextEncoder.from_files(tmp_path / "weights.safetensors", original_root / ORIGINAL_TOKENIZER)
    assert loaded.model.config.num_heads == HEADS and loaded.model.config.d_kv == DIM // HEADS
    assert torch.equal(encoder.encode(["w5 w6"])[0], loaded.encode(["w5 w6"])[0])


def test_loads_in_bfloat16(original_root: Path) -> None:
    enc = WanTextEncoder.from_pretrained(original_root, dtype=torch.bfloat16, text_len=16)
    assert all(p.dtype == torch.bfloat16 for p in enc.model.parameters())
    out = enc.encode(["w1 w2"])[0]
    assert out.dtype == torch.bfloat16 and out.shape == (3, DIM) and torch.isfinite(out).all()


def _corrupt_original(sd: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], str]:
    sd = dict(sd)
    if kind == "missing":
        del sd["blocks.1.attn.k.weight"]
        return sd, "blocks.1.attn.k.weight"
    if kind == "unexpected":
        sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
        return sd, "blocks.0.attn.extra.weight"
    sd["blocks.2.ffn.fc2.weight"] = torch.zeros(DIM, FFN + 1)
    return sd, "blocks.2.ffn.fc2.weight"


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_bad_original_checkpoint_names_key_and_file(
    wan_sd: dict[str, torch.Tensor], original_root: Path, tmp_path: Path, kind: str
) -> None:
    bad, key = _corrupt_original(wan_sd, kind)
    path = tmp_path / ORIGINAL_WEIGHTS
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as info:
        WanTextEncoder.from_files(path, original_root / ORIGINAL_TOKENIZER)
    assert key in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_bad_diffusers_checkpoint_names_key_and_file(encoder: WanTextEncoder, tmp_path: Path, kind: str) -> None:
    encoder.save_pretrained(tmp_path, layout="diffusers")
    path = tmp_path / "text_encoder/model.safetensors"
    sd = load_file(str(path))
    key = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    if kind == "missing":
        del sd[key]
    elif kind == "unexpected":
        key = "encoder.block.1.layer.0.SelfAttention.extra"
        sd[key] = torch.zeros(2)
    else:
        sd[key] = torch.zeros(FFN, DIM + 2)
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        WanTextEncoder.from_pretrained(tmp_path)
    assert key in str(info.value) and str(path) in str(info.value)


def test_from_pretrained_without_a_known_layout_fails(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="neither"):
        WanTextEncoder.from_pretrained(tmp_path)


def test_tokenizer_larger_than_vocab_is_rejected(encoder: WanTextEncoder, tmp_path: Path) -> None:
    big = build_word_tokenizer([f"x{i}" for i in range(VOCAB)], tmp_path)
    with pytest.raises(ValueError, match="300 rows"):
        WanTextEncoder(encoder.model, big)


# ---------------------------------------------------------------- key map and config (release shapes, on meta)
def test_key_map_and_config_on_release_shapes() -> None:
    cfg = UMT5Config(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
    )
    with torch.device("meta"):
        hf_sd = UMT5EncoderModel(cfg).state_dict()
    wan = transformers_to_wan_t5(hf_sd)
    per_block = [
        "norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
        "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
    ]
    expected = {"token_embedding.weight", "norm.weight"} | {f"blocks.{i}.{s}" for i in range(24) for s in per_block}
    assert set(wan) == expected
    assert tuple(wan["blocks.3.pos_embedding.embedding.weight"].shape) == (32, 64)
    back = wan_t5_to_transformers(wan)
    assert set(back) == set(hf_sd)
    assert back["shared.weight"] is back["encoder.embed_tokens.weight"]
    assert all(tuple(back[k].shape) == tuple(hf_sd[k].shape) for k in hf_sd)

    inferred = umt5_config_from_wan_state_dict(wan)
    got = (inferred.vocab_size, inferred.d_model, inferred.d_ff, inferred.num_layers, inferred.num_heads, inferred.d_kv)
    assert got == (256384, 4096, 10240, 24, 64, 64)
    assert inferred.relative_attention_num_buckets == 32 and inferred.relative_attention_max_distance == 128
    assert inferred.is_gated_act and inferred.dense_act_fn == "gelu_new" and inferred.layer_norm_epsilon == 1e-6


def test_key_map_rejects_foreign_keys() -> None:
    with pytest.raises(CheckpointError, match="decoder.block.0"):
        transformers_to_wan_t5({"shared.weight": 0, "decoder.block.0.layer.0.layer_norm.weight": 0})
    with pytest.raises(CheckpointError, match="blocks.0.cross_attn.q.weight"):
        wan_t5_to_transformers({"token_embedding.weight": 0, "blocks.0.cross_attn.q.weight": 0})


# ---------------------------------------------------------------- word tokenizer
def test_word_tokenizer_reloads_with_identical_ids(tmp_path: Path) -> None:
    built = build_word_tokenizer(["Cat", "sits", "on", "the", "mat", ",", ".", "cat"], tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    texts = ["The CAT sits, on the mat.", "dog on mat", ""]
    kwargs = dict(padding="max_length", truncation=True, max_length=12, add_special_tokens=True)
    a, b = built(texts, **kwargs), loaded(texts, **kwargs)
    assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert b["input_ids"][0] == [6, 3, 4, 8, 5, 6, 7, 9, 1, 0, 0, 0]  # "cat" deduplicated: 7 words + 3 specials
    assert b["input_ids"][1] == [2, 5, 7, 1] + [0] * 8
    assert b["input_ids"][2] == [1] + [0] * 11
    assert len(loaded) == 10


def test_word_tokenizer_rejects_multi_token_entries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="don't"):
        build_word_tokenizer(["fine", "don't"], tmp_path)
