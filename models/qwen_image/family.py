"""The Qwen-Image family's entry in the model registry: which folders are Qwen-Image checkpoints, their
description, and the factories of their text encoder, DiT and VAE.

A Qwen-Image folder is the diffusers release (Qwen/Qwen-Image ships only that layout): `model_index.json` naming
`QwenImagePipeline`, with transformer/, vae/, text_encoder/ (a whole Qwen2.5-VL-7B-Instruct checkpoint),
tokenizer/ and scheduler/. Nothing here imports torch until a factory is called.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from models.config_files import diffusers_transformer_folder, read_diffusers_config
from models.errors import CheckpointError
from models.family import ModelDescription, TeaCacheCalibration
from models.qwen_image.config import (
    DIFFUSERS_CLASS,
    QWEN_IMAGE_LATENT,
    QWEN_IMAGE_SAMPLERS,
    QwenImageDiTConfig,
    QwenImagePreset,
    match_preset,
)

if TYPE_CHECKING:
    import torch

    from models.qwen_image.text_encoder import QwenImageTextEncoder
    from models.qwen_image.transformer import QwenImageTransformer
    from models.qwen_image.vae import QwenImageVAE

PIPELINE_CLASS = "QwenImagePipeline"
FOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")


def recognises(root: Path) -> bool:
    """A diffusers folder whose model_index.json names `QwenImagePipeline`."""
    index = root / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError):
        return False


def describe(root: Path) -> ModelDescription:
    """The description of the Qwen-Image release in `root` (CheckpointError naming what is missing otherwise)."""
    missing = [name for name in FOLDERS if not (root / name).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: the Qwen-Image release folder lacks {', '.join(m + '/' for m in missing)} "
                              f"(expected {', '.join(f + '/' for f in FOLDERS)} and scheduler/)")
    folder = diffusers_transformer_folder(root, "Qwen-Image")
    dit = read_diffusers_config(folder, DIFFUSERS_CLASS, QwenImageDiTConfig.from_diffusers_json)
    components = {"transformer": folder, **{name: root / name for name in FOLDERS[1:]}}
    return description(match_preset(dit), root, components)


def description(preset: QwenImagePreset, root: Path = Path("."), components: dict[str, Path] | None = None
                ) -> ModelDescription:
    """What a Qwen-Image preset means to the layers above models/ (also for presets without a folder).

    True classifier-free guidance (two DiT branches per step, so CFG parallelism applies) combined as
    v_u + g (v_c - v_u) and then rescaled per DiT token to the norm of the conditional velocity, as the release
    pipeline does; a flow-match Euler schedule with the release's resolution-dependent shift, stretched so its
    last non-zero sigma is 0.02; " " as the negative prompt when none is given (the release's recommendation).
    TeaCache reads the first block's modulated image tokens; no coefficients are published for Qwen-Image.
    """
    dit = preset.dit
    return ModelDescription(
        family="qwen-image", name=preset.name, root=root, output="image", num_heads=dit.num_attention_heads,
        num_experts=1, guidance="cfg", defaults=preset.defaults,
        latent=dataclasses.replace(QWEN_IMAGE_LATENT, channels=dit.latent_channels),
        text_len=preset.max_sequence_length, samplers=QWEN_IMAGE_SAMPLERS, max_frames=1,
        negative_prompt=preset.negative_prompt, components=dict(components or {}),
        teacache={"default": TeaCacheCalibration("modulated_input", None)}, num_blocks=dit.num_layers,
        cfg_form="uncond", cfg_renorm=True, shift_terminal=preset.shift_terminal)


# ---- factories: what the stages build from a description (torch and transformers load only here) ----
def load_text_encoder(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str"
                      ) -> "QwenImageTextEncoder":
    """Qwen2.5-VL's language model, keeping at most the model's text length per prompt."""
    from models.qwen_image.text_encoder import QwenImageTextEncoder

    return QwenImageTextEncoder.from_pretrained(model.root, dtype=dtype, device=device,
                                                max_sequence_length=model.text_len)


def load_denoisers(model: ModelDescription, dtype: "torch.dtype", device: "torch.device | str"
                   ) -> tuple[list["QwenImageTransformer"], None]:
    """The one DiT (Qwen-Image has no experts)."""
    from models.qwen_image.transformer import QwenImageTransformer

    path = model.components.get("transformer", model.root)
    return [QwenImageTransformer.from_pretrained(path, dtype=dtype, device=device)], None


def load_decoder(model: ModelDescription, device: "torch.device | str") -> "QwenImageVAE":
    """The VAE in fp32 (as the reference decodes)."""
    import torch

    from models.qwen_image.vae import QwenImageVAE

    return QwenImageVAE.from_pretrained(model.components.get("vae", model.root), dtype=torch.float32, device=device)
