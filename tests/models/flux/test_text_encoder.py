"""FluxTextEncoder vs diffusers `FluxPipeline.encode_prompt` with the same tiny CLIP / T5 and tokenizers.

The test writes a release folder (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/) with tiny
random encoders and word-level tokenizers built offline: CLIP-style (BOS/EOS at the top of the vocab,
EOS also the pad) and T5-style (pad 0, EOS 1 appended). Both sides run the same transformers classes,
so what is tested is everything around them: padding, truncation, no masks, the pooled EOS state,
prompt_2 handling, and strict loading of both files. Expected max |diff| = 0 (measured).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from models.flux import tiny
from models.flux.text_encoder import CLIP_MAX_LENGTH, FluxTextEncoder
from models.loading import CheckpointError
from models.random_init import randomize_parameters
from models.wan.tokenizer import build_word_tokenizer

diffusers = pytest.importorskip("diffusers")

WORDS = [f"w{i}" for i in range(120)] + ["a", "cat", "on", "the", "moon", ".", ","]
ATOL = 1e-6  # measured 0: same classes and ids on both sides
PROMPTS = ["a cat on the moon .", " ".join(f"w{i % 120}" for i in range(100)), "w7 , w8 unknownword"]
PROMPTS_2 = ["the moon", "w1 w2 w3", " ".join(f"w{i}" for i in range(90))]


def build_clip_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Word-level, lowercased; BOS/EOS get the two highest ids (as in CLIP-L), EOS pads, 77 tokens max."""
    return tiny.build_clip_tokenizer(out_dir, tuple(WORDS))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flux_release")
    clip_tok = build_clip_tokenizer(root / "tokenizer")
    t5_tok = build_word_tokenizer(WORDS, root / "tokenizer_2")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", projection_dim=32,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok) + 5, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1))
    randomize_parameters(clip, seed=1)
    randomize_parameters(t5, seed=2)
    clip.save_pretrained(root / "text_encoder")
    t5.save_pretrained(root / "text_encoder_2")
    # The release's CLIP file was written by an older transformers: every key under `text_model.`.
    path = root / "text_encoder" / "model.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(str(path)).items()}, str(path))
    return root


@pytest.fixture(scope="module")
def pipeline(release: Path) -> "diffusers.FluxPipeline":
    from transformers import AutoTokenizer

    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(release / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(str(release / "tokenizer")),
        text_encoder_2=T5EncoderModel.from_pretrained(release / "text_encoder_2").eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(str(release / "tokenizer_2")),
    )


@pytest.mark.parametrize("max_sequence_length", [512, 40])
def test_encode_matches_flux_pipeline(release: Path, pipeline, max_sequence_length: int) -> None:
    encoder = FluxTextEncoder.from_pretrained(release, max_sequence_length=max_sequence_length)
    for prompts_2 in (None, PROMPTS_2):
        with torch.no_grad():
            want_context, want_pooled, _ = pipeline.encode_prompt(
                prompt=PROMPTS, prompt_2=prompts_2, device="cpu", max_sequence_length=max_sequence_length)
        context, pooled = encoder.encode(PROMPTS, prompts_2)
        assert context.shape == (3, max_sequence_length, 24) and pooled.shape == (3, 32)
        torch.testing.assert_close(context, want_context, rtol=0, atol=ATOL)
        torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=ATOL)
    # Padded positions are encoded (not zero, not cut): the DiT sees them as in the release.
    assert context[0, -1].abs().sum() > 0


def test_pooled_is_the_first_eos_state_and_long_prompts_truncate(release: Path) -> None:
    encoder = FluxTextEncoder.from_pretrained(release, max_sequence_length=16)
    ids = encoder.clip_tokenizer(PROMPTS[1:2], padding="max_length", max_length=CLIP_MAX_LENGTH,
                                 truncation=True, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, CLIP_MAX_LENGTH) and int(ids[0, -1]) == encoder.clip_tokenizer.eos_token_id
    with torch.no_grad():
        hidden = encoder.clip(ids).last_hidden_state
    _, pooled = encoder.encode(PROMPTS[1:2])
    torch.testing.assert_close(pooled[0], hidden[0, -1], rtol=0, atol=0)
    # Short prompt: pooled = state at the first EOS, not at the last pad.
    _, pooled_short = encoder.encode(["a cat"])
    with torch.no_grad():
        hidden_short = encoder.clip(encoder.clip_tokenizer(["a cat"], padding="max_length", max_length=77,
                                                           return_tensors="pt")["input_ids"]).last_hidden_state
    torch.testing.assert_close(pooled_short[0], hidden_short[0, 3], rtol=0, atol=0)


def test_strict_loading_names_the_file_and_key(release: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    path = broken / "text_encoder_2" / "model.safetensors"
    sd = load_file(str(path))
    sd.pop("encoder.final_layer_norm.weight")
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"(?s)text_encoder_2.*missing keys.*encoder\.final_layer_norm\.weight"):
        FluxTextEncoder.from_pretrained(broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(CheckpointError, match="missing tokenizer_2/"):
        FluxTextEncoder.from_pretrained(broken)


def test_bad_arguments(release: Path) -> None:
    with pytest.raises(ValueError, match=r"max_sequence_length must be in 1\.\.512"):
        FluxTextEncoder.from_pretrained(release, max_sequence_length=513)
    encoder = FluxTextEncoder.from_pretrained(release, max_sequence_length=8)
    with pytest.raises(TypeError, match="wrap it as"):
        encoder.encode("a cat")
    with pytest.raises(ValueError, match="as many prompts_2"):
        encoder.encode(["a", "b"], ["c"])


def test_released_encoder_shapes_on_meta() -> None:
    from models.flux.text_config import CLIP_L_ARCH, FLUX1_DEV_TEXT, FLUX1_SCHNELL_TEXT, T5_XXL_ARCH
    from models.loading import meta_device

    with meta_device():
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_ARCH))
        t5 = T5EncoderModel(T5Config(**T5_XXL_ARCH))
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    assert clip.config.hidden_size == FLUX1_DEV_TEXT.pooled_dim and t5.config.d_model == FLUX1_DEV_TEXT.context_dim
    assert (FLUX1_DEV_TEXT.t5_max_length, FLUX1_SCHNELL_TEXT.t5_max_length) == (512, 256)


def test_bf16_load_keeps_the_t5_embedding_tied(release: Path) -> None:
    encoder = FluxTextEncoder.from_pretrained(release, dtype=torch.bfloat16, max_sequence_length=8)
    assert encoder.t5.shared.weight is encoder.t5.encoder.embed_tokens.weight
    assert encoder.t5.shared.weight.dtype == torch.bfloat16 and encoder.clip.dtype == torch.bfloat16
    context, pooled = encoder.encode(["a cat"])
    assert context.dtype == pooled.dtype == torch.bfloat16 and context.shape == (1, 8, 24)
