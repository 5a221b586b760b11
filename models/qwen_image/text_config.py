"""Qwen-Image's prompt encoding as torch-free constants: the chat template, its token count, the length limits and
the released text encoder's shape.

The engine reads these without torch or transformers. The architecture dict holds the keyword arguments of
transformers' `Qwen2_5_VLTextConfig` for the language model of Qwen2.5-VL-7B-Instruct (the released
text_encoder/), used to check parameter counts on the meta device; loading always reads the folder's config.json.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["MAX_SEQUENCE_LENGTH", "PROMPT_TEMPLATE", "QWEN25_VL_7B_TEXT_ARCH", "TEMPLATE_PREFIX_TOKENS",
           "TOKENIZER_MAX_LENGTH"]

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""The chat template every prompt is wrapped in before encoding (the release pipeline's, `{}` = the prompt)."""

TEMPLATE_PREFIX_TOKENS = 34
"""Tokens of the template before the prompt (system turn + "<|im_start|>user\\n"), which the pipeline drops from
the encoder output: a fixed count, as the release pipeline hard-codes it (the release tokenizer encodes that
prefix to exactly 34 tokens; a tokenizer that does not is refused at load)."""

TOKENIZER_MAX_LENGTH = 1024
"""Tokens the pipeline keeps after the template prefix at tokenisation: it truncates at 1024 + 34."""

MAX_SEQUENCE_LENGTH = 512
"""The most text tokens the DiT receives per prompt (the release pipeline's `max_sequence_length` default; it
takes at most 1024)."""

QWEN25_VL_7B_TEXT_ARCH: Mapping[str, Any] = MappingProxyType({
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
})
"""Qwen2_5_VLTextConfig kwargs of Qwen2.5-VL-7B-Instruct's language model (7,070,619,136 parameters without the
vision tower and the LM head, which Qwen-Image does not use)."""
