"""Flux2TextEncoder: the prompt embeddings of diffusers' Flux2KleinPipeline.encode_prompt, at klein's settings.

A tiny random Qwen3 (width 16, 28 decoder layers so that hidden states 9, 18 and 27 exist, every parameter
random) saved as the release saves it (Qwen3ForCausalLM), with the offline Qwen3-style tokenizer. The pipeline
runs with its defaults (512 tokens, layers 9/18/27, thinking off). Tolerance: exact equality, since both
sides run the same transformers modules on the same ids and mask in fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.flux2.text_encoder import FLUX2_HIDDEN_LAYERS, FLUX2_TEXT_LEN, Flux2TextEncoder
from models.qwen3_text import write_tiny_qwen3

HIDDEN, LAYERS = 16, 28
PROMPTS = ["a red circle on the moon", ""]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("klein-text")
    write_tiny_qwen3(root / "text_encoder", root / "tokenizer", HIDDEN, LAYERS, seed=3, causal_lm=True)
    return root


def test_matches_flux2_klein_encode_prompt(root: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(root / "text_encoder"), dtype=torch.float32).eval()
    tokenizer = Qwen2Tokenizer.from_pretrained(str(root / "tokenizer"))
    pipe = diffusers.Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer,
                                        transformer=None, is_distilled=True)
    with torch.no_grad():
        theirs, text_ids = pipe.encode_prompt(list(PROMPTS), device=torch.device("cpu"))
    assert theirs.shape == (2, FLUX2_TEXT_LEN, 3 * HIDDEN) and text_ids.shape == (2, FLUX2_TEXT_LEN, 4)

    encoder = Flux2TextEncoder.from_pretrained(root)
    assert (encoder.hidden_layers, encoder.max_length, encoder.enable_thinking, encoder.keep_padding) == (
        FLUX2_HIDDEN_LAYERS, 512, False, True)
    assert encoder.dim == 3 * HIDDEN
    ours = encoder.conditioning(PROMPTS)
    for mine, ref in zip(ours, theirs):
        assert mine.mask is None and mine.pooled is None and mine.context.dtype == torch.float32
        assert torch.equal(mine.context, ref)  # all 512 rows, padding included
    # The padded rows are not all alike (the DiT sees them), and the empty prompt still gets 512 rows.
    assert len(ours[1].context) == FLUX2_TEXT_LEN and not torch.equal(ours[0].context[-1], ours[0].context[100])


def test_a_shallow_encoder_names_the_missing_hidden_states(tmp_path: Path) -> None:
    from models.flux2.tiny import TEXT_LAYERS

    assert TEXT_LAYERS == max(FLUX2_HIDDEN_LAYERS) + 1  # the tiny release's encoder is just deep enough
    write_tiny_qwen3(tmp_path / "text_encoder", tmp_path / "tokenizer", HIDDEN, 20, seed=0)
    with pytest.raises(ValueError, match=r"hidden_layers \[27\] out of range: the encoder has 21 hidden states"):
        Flux2TextEncoder.from_pretrained(tmp_path)
