"""QwenImageTextEncoder vs diffusers `QwenImagePipeline.encode_prompt` with the same tiny Qwen2.5-VL and tokenizer.

The fixture writes text_encoder/ (a whole tiny Qwen2.5-VL checkpoint: language model, one vision block, LM head,
every parameter random, in the key layout transformers writes for the release) and tokenizer/ (a byte-level BPE
Qwen2Tokenizer trained offline, template prefix = 34 tokens). diffusers loads them as the release is loaded
(`Qwen2_5_VLForConditionalGeneration`, `Qwen2Tokenizer`); we load only the language model. What is tested is
everything around the transformers classes: the template, truncation, right padding, the mask, hidden_states[-1],
the 34-token drop, the 512 cut, dropping the vision tower and LM head explicitly and strict loading.

Tolerance: diffusers encodes each prompt alone (batch 1, no padding); we encode a batch padded to its longest
prompt, where SDPA's masked softmax rounds differently: measured max |diff| 1.0e-6 (values O(1)); asserted 1e-5.
Against diffusers' own batched call (the same padded batch) the measured difference is 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.loading import CheckpointError
from models.qwen_image.text_config import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS
from models.qwen_image.text_encoder import QwenImageTextEncoder, release_to_text_model

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5  # batched (padded, masked) vs one prompt at a time; measured 1.0e-6
WIDTH = 24
PROMPTS = ["a red circle on the moon", " ", "w1 w2 w3 unknownword Ünïcode 123 !!", "a cat"]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.qwen_image.tiny import write_text_encoder

    root = tmp_path_factory.mktemp("qwen_text")
    write_text_encoder(root, WIDTH, seed=3)
    return root


@pytest.fixture(scope="module")
def pipeline(release: Path) -> "diffusers.QwenImagePipeline":
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    return diffusers.QwenImagePipeline(
        scheduler=None, vae=None, transformer=None, tokenizer=Qwen2Tokenizer.from_pretrained(release / "tokenizer"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(release / "text_encoder").eval())


@pytest.fixture(scope="module")
def encoder(release: Path) -> QwenImageTextEncoder:
    return QwenImageTextEncoder.from_pretrained(release)


@pytest.mark.parametrize("max_sequence_length", [512, 8])
def test_encode_matches_the_pipeline(release: Path, pipeline, max_sequence_length: int) -> None:
    encoder = QwenImageTextEncoder.from_pretrained(release, max_sequence_length=max_sequence_length)
    ours = encoder.conditioning(PROMPTS)
    with torch.no_grad():
        batched, batched_mask = pipeline.encode_prompt(PROMPTS, device="cpu", max_sequence_length=max_sequence_length)
        for i, prompt in enumerate(PROMPTS):
            alone, mask = pipeline.encode_prompt(prompt, device="cpu", max_sequence_length=max_sequence_length)
            assert mask is None  # one prompt: every row real
            assert ours[i].mask is None and ours[i].pooled is None and ours[i].context.dtype == torch.float32
            torch.testing.assert_close(ours[i].context, alone[0], rtol=0, atol=ATOL)
            n = len(ours[i].context)
            assert n <= max_sequence_length and int(batched_mask[i].sum()) == n
            torch.testing.assert_close(ours[i].context, batched[i, :n], rtol=0, atol=0)
    lengths = [len(c.context) for c in ours]
    if max_sequence_length == 8:
        assert lengths == [8, 6, 8, 7]  # " " keeps itself and the 5 closing template tokens
    assert len(set(lengths)) > 1, "the prompts must differ in length, or the padding is not exercised"


def test_the_template_prefix_is_34_tokens_and_dropped(encoder: QwenImageTextEncoder) -> None:
    tokenizer = encoder.tokenizer
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(tokenizer(prefix)["input_ids"]) == TEMPLATE_PREFIX_TOKENS == 34
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    full = tokenizer(PROMPT_TEMPLATE.format("a cat"))["input_ids"]
    assert full[:34] == tokenizer(prefix)["input_ids"]
    context = encoder.encode(["a cat"])[0]
    assert len(context) == len(full) - 34  # the prompt and "<|im_end|>\n<|im_start|>assistant\n" stay
    with torch.no_grad():
        hidden = encoder.model(input_ids=torch.tensor([full]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(context, hidden[34:], rtol=0, atol=0)


def test_a_tokenizer_with_another_template_prefix_is_refused(encoder: QwenImageTextEncoder, tmp_path: Path) -> None:
    from models.wan.tokenizer import build_word_tokenizer

    other = build_word_tokenizer(["describe", "the", "image"], tmp_path / "tok")
    with pytest.raises(ValueError, match=r"prefix to \d+ tokens; the pipeline drops 34"):
        QwenImageTextEncoder(encoder.model, other)


def test_release_keys_map_to_the_language_model() -> None:
    t = torch.zeros(1)
    legacy = {"model.embed_tokens.weight": t, "model.layers.0.mlp.up_proj.weight": t, "model.norm.weight": t,
              "visual.blocks.0.attn.qkv.weight": t, "visual.merger.mlp.0.bias": t, "lm_head.weight": t}
    sd, dropped = release_to_text_model(legacy)
    assert sorted(sd) == ["embed_tokens.weight", "layers.0.mlp.up_proj.weight", "norm.weight"]
    assert dropped == ["lm_head.weight", "visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.bias"]
    newer = {"model.language_model.norm.weight": t, "model.visual.patch_embed.proj.weight": t, "lm_head.weight": t,
             "something.else": t}
    sd, dropped = release_to_text_model(newer)
    assert sorted(sd) == ["norm.weight", "something.else"]  # unknown keys stay, for the strict load to name
    assert dropped == ["lm_head.weight", "model.visual.patch_embed.proj.weight"]
    with pytest.raises(CheckpointError, match="norm.weight twice"):
        release_to_text_model({"model.norm.weight": t, "model.language_model.norm.weight": t})


def test_the_release_file_holds_the_dropped_parts(release: Path) -> None:
    keys = load_file(str(release / "text_encoder" / "model.safetensors")).keys()
    assert any(k.startswith("visual.") for k in keys) and "lm_head.weight" in keys
    assert "model.embed_tokens.weight" in keys  # the release's (transformers-written) names


def test_strict_loading_names_the_file_and_key(release: Path, tmp_path: Path) -> None:
    import shutil

    for change, pattern in ((lambda sd: sd.pop("model.norm.weight"), r"missing keys: norm\.weight"),
                            (lambda sd: sd.update({"model.extra.weight": torch.zeros(2)}),
                             r"unexpected keys: extra\.weight")):
        broken = tmp_path / "broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(release, broken)
        path = broken / "text_encoder" / "model.safetensors"
        sd = load_file(str(path))
        change(sd)
        save_file(sd, str(path))
        with pytest.raises(CheckpointError, match=rf"(?s)text_encoder/model\.safetensors.*{pattern}"):
            QwenImageTextEncoder.from_pretrained(broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(CheckpointError, match="missing tokenizer/"):
        QwenImageTextEncoder.from_pretrained(broken)


def test_bad_arguments(encoder: QwenImageTextEncoder) -> None:
    with pytest.raises(ValueError, match=r"max_sequence_length must be in 1\.\.1024"):
        QwenImageTextEncoder(encoder.model, encoder.tokenizer, max_sequence_length=1025)
    with pytest.raises(TypeError, match="wrap it as"):
        encoder.encode("a cat")
    assert encoder.conditioning([]) == []


def test_bf16_load(release: Path) -> None:
    encoder = QwenImageTextEncoder.from_pretrained(release, dtype=torch.bfloat16, max_sequence_length=8)
    assert encoder.model.embed_tokens.weight.dtype == torch.bfloat16
    assert encoder.model.rotary_emb.inv_freq.dtype == torch.float32  # rebuilt, not cast
    (context,) = encoder.encode(["a cat"])
    assert context.dtype == torch.bfloat16 and context.shape == (7, WIDTH)


def test_released_language_model_on_meta() -> None:
    """The released Qwen2.5-VL-7B language model's shape: 3584 wide (the DiT's joint_attention_dim)."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from models.loading import meta_device
    from models.qwen_image.config import PRESETS
    from models.qwen_image.text_config import QWEN25_VL_7B_TEXT_ARCH

    with meta_device():
        model = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**QWEN25_VL_7B_TEXT_ARCH))
    assert sum(p.numel() for p in model.parameters()) == 7_070_619_136
    assert model.config.hidden_size == PRESETS["qwen-image"].dit.joint_attention_dim


def test_a_flat_legacy_config_json_reads_the_same(release: Path, encoder: QwenImageTextEncoder,
                                                  tmp_path: Path) -> None:
    """Older transformers wrote Qwen2.5-VL's config.json flat (text fields at the top, `rope_scaling` with the
    M-RoPE sections, no text_config), as the release's may be: it gives the same encoder."""
    import json
    import shutil

    root = tmp_path / "flat"
    shutil.copytree(release, root)
    nested = json.loads((root / "text_encoder" / "config.json").read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**nested, **{k: v for k, v in text.items() if k not in ("model_type", "layer_types")},
            "model_type": "qwen2_5_vl", "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    (root / "text_encoder" / "config.json").write_text(json.dumps(flat))
    again = QwenImageTextEncoder.from_pretrained(root)
    assert again.model.config.hidden_size == WIDTH and again.model.config.num_hidden_layers == 2
    for a, b in zip(again.encode(PROMPTS), encoder.encode(PROMPTS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_sharded_text_encoder_loads(release: Path, encoder: QwenImageTextEncoder, tmp_path: Path) -> None:
    """The release's text_encoder/ is sharded (model-0000k-of-0000n.safetensors + model.safetensors.index.json)."""
    import shutil

    from transformers import Qwen2_5_VLForConditionalGeneration

    root = tmp_path / "sharded"
    shutil.copytree(release / "tokenizer", root / "tokenizer")
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(release / "text_encoder")
    full.save_pretrained(root / "text_encoder", max_shard_size="20KB")
    assert (root / "text_encoder" / "model.safetensors.index.json").is_file()
    again = QwenImageTextEncoder.from_pretrained(root)
    for a, b in zip(again.encode(PROMPTS), encoder.encode(PROMPTS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_another_model_type_is_refused(release: Path, tmp_path: Path) -> None:
    import json
    import shutil

    shutil.copytree(release, tmp_path / "other")
    path = tmp_path / "other" / "text_encoder" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "qwen3"}))
    with pytest.raises(CheckpointError, match=r"is a 'qwen3' model; Qwen-Image's text encoder is Qwen2\.5-VL"):
        QwenImageTextEncoder.from_pretrained(tmp_path / "other")
