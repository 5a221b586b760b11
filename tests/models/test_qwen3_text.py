"""Qwen3PromptEncoder: the conditioning of diffusers' ZImagePipeline.encode_prompt and of Flux2KleinPipeline's
`_get_qwen3_prompt_embeds`, both folder layouts, strict loading and the argument checks.

The encoders are tiny random Qwen3s (every parameter random) with the offline byte-level tokenizer and the
Qwen3-style chat template of `models.qwen3_text`; diffusers runs the transformers classes the released
folders name (Qwen3ForCausalLM, Qwen2Tokenizer) on the same files. Tolerance: exact equality. Both sides run
the same transformers modules on the same ids and mask in fp32 (ours loads the weights into a `Qwen3Model`
strictly instead of through `from_pretrained`), so nothing may differ; a wrong hidden-state index, layer
order, template flag, padding rule or lost mask changes the rows by O(1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.loading import CheckpointError
from models.qwen3_text import Qwen3PromptEncoder, load_qwen3_tokenizer, write_tiny_qwen3

HIDDEN = 16
MAX_LENGTH = 32
PROMPTS = ["a red circle on the moon", "", "a blue square under the sky, " * 4 + "a cat on the moon"]  # 3rd: truncated


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-layer encoder saved both ways (same weights) and a 28-layer one (FLUX.2-klein's layers 9, 18, 27)."""
    out = {}
    for name, layers, causal in (("causal", 3, True), ("plain", 3, False), ("deep", 28, True)):
        root = tmp_path_factory.mktemp(f"qwen3-{name}")
        write_tiny_qwen3(root / "text_encoder", root / "tokenizer", HIDDEN, layers, seed=7, causal_lm=causal)
        out[name] = root
    return out


def _reference_encoder(root: Path):  # noqa: ANN202 - transformers types
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(root / "text_encoder"), dtype=torch.float32).eval()
    return model, Qwen2Tokenizer.from_pretrained(str(root / "tokenizer"))


def test_template_renders_the_thinking_branch(folders: dict[str, Path]) -> None:
    tokenizer = load_qwen3_tokenizer(folders["causal"] / "tokenizer")
    on = tokenizer.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)
    off = tokenizer.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                        add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    ids = tokenizer(on)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:5] == ["<|im_start|>", "user", "Ċ", "a", "Ġcat"]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id > max(ids[1:4])  # special tokens sit at the top, as in the release


def test_matches_z_image_encode_prompt(folders: dict[str, Path]) -> None:
    diffusers = pytest.importorskip("diffusers")
    model, tokenizer = _reference_encoder(folders["causal"])
    pipe = diffusers.ZImagePipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer,
                                    transformer=None)
    theirs, negative = pipe.encode_prompt(list(PROMPTS), device=torch.device("cpu"),
                                          do_classifier_free_guidance=False, max_sequence_length=MAX_LENGTH)
    assert negative == []
    ours = Qwen3PromptEncoder.from_pretrained(folders["causal"], max_length=MAX_LENGTH).encode(PROMPTS)
    lengths = [len(c.context) for c in ours]
    assert lengths[1] < lengths[0] < lengths[2] == MAX_LENGTH  # the last prompt is truncated
    for mine, ref in zip(ours, theirs):
        assert mine.mask is None and mine.pooled is None and mine.context.dtype == torch.float32
        assert torch.equal(mine.context, ref)


def test_matches_flux2_klein_prompt_embeds(folders: dict[str, Path]) -> None:
    diffusers = pytest.importorskip("diffusers")
    model, tokenizer = _reference_encoder(folders["deep"])
    theirs = diffusers.Flux2KleinPipeline._get_qwen3_prompt_embeds(
        model, tokenizer, list(PROMPTS), dtype=torch.float32, device=torch.device("cpu"),
        max_sequence_length=MAX_LENGTH, hidden_states_layers=(9, 18, 27))
    encoder = Qwen3PromptEncoder.from_pretrained(folders["deep"], max_length=MAX_LENGTH, hidden_layers=(9, 18, 27),
                                                 enable_thinking=False, keep_padding=True)
    assert encoder.dim == 3 * HIDDEN
    ours = encoder.encode(PROMPTS)
    assert theirs.shape == (3, MAX_LENGTH, 3 * HIDDEN)
    for mine, ref in zip(ours, theirs):
        assert mine.mask is None and torch.equal(mine.context, ref)  # padding rows included


@torch.no_grad()
def test_layer_major_order_and_the_valid_rows(folders: dict[str, Path]) -> None:
    """context = [hidden_states[a] | hidden_states[b]] per row, from the encoder run on the padded batch."""
    encoder = Qwen3PromptEncoder.from_pretrained(folders["plain"], max_length=MAX_LENGTH, hidden_layers=(-1, 1))
    batch = encoder.tokenizer([encoder.render(p) for p in PROMPTS[:2]], padding="max_length",
                              max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    states = encoder.model(**batch, output_hidden_states=True).hidden_states
    assert len(states) == 4
    ours = encoder.encode(PROMPTS[:2])
    for i, cond in enumerate(ours):
        valid = batch["attention_mask"][i].bool()
        assert torch.equal(cond.context[:, :HIDDEN], states[-1][i][valid])
        assert torch.equal(cond.context[:, HIDDEN:], states[1][i][valid])
    # right padding: the valid rows are the first ones, and padding never changes them
    alone = encoder.encode(PROMPTS[:1])[0]
    assert torch.equal(alone.context, ours[0].context)


def test_both_folder_layouts_load_the_same_encoder(folders: dict[str, Path]) -> None:
    a = Qwen3PromptEncoder.from_pretrained(folders["causal"], max_length=MAX_LENGTH)
    b = Qwen3PromptEncoder.from_pretrained(folders["plain"], max_length=MAX_LENGTH)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x.context, y.context) for x, y in zip(a.encode(PROMPTS), b.encode(PROMPTS)))
    assert a.conditioning == a.encode  # the stages' TextEncoder protocol


def test_strict_loading_names_the_bad_keys(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    for name, edit, expected in (
        ("missing", lambda sd: sd.pop("model.norm.weight"), "missing keys: norm.weight"),
        ("unexpected", lambda sd: sd.__setitem__("model.layers.7.mlp.up_proj.weight", torch.zeros(2)),
         "unexpected keys: layers.7.mlp.up_proj.weight"),
        ("mixed", lambda sd: sd.__setitem__("norm.weight", torch.zeros(2)), "mixes Qwen3ForCausalLM keys"),
    ):
        root = tmp_path / name
        shutil.copytree(folders["causal"], root)
        path = root / "text_encoder" / "model.safetensors"
        sd = load_file(str(path))
        edit(sd)
        save_file(sd, str(path))
        with pytest.raises(CheckpointError, match=expected):
            Qwen3PromptEncoder.from_pretrained(root)
    with pytest.raises(CheckpointError, match="text_encoder/ and tokenizer/"):
        Qwen3PromptEncoder.from_pretrained(tmp_path / "nothing")


def test_argument_checks(folders: dict[str, Path]) -> None:
    encoder = Qwen3PromptEncoder.from_pretrained(folders["causal"], max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match="out of range"):
        Qwen3PromptEncoder(encoder.model, encoder.tokenizer, hidden_layers=(4,))
    with pytest.raises(ValueError, match="at least one"):
        Qwen3PromptEncoder(encoder.model, encoder.tokenizer, hidden_layers=())
    with pytest.raises(TypeError, match="wrap it"):
        encoder.encode("a cat")
    assert encoder.encode([]) == []
    encoder.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        Qwen3PromptEncoder(encoder.model, encoder.tokenizer)
