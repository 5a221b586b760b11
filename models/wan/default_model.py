"""The embedded default model: what runs when no checkpoint is named.

Real Wan weights cannot be downloaded on the machines this project is built on, so the default is
`wan-tiny-shapes`: a tiny Wan (same classes as Wan2.1: WanTransformer, WanVAE, the umT5 encoder, at
tiny widths) trained on a synthetic text-to-video task (`models.wan.tiny.shapes`: coloured circles,
squares and triangles moving on a white background) by the recipe in `models.wan.tiny.train`. It ships
inside the package (`models/wan/tiny/wan-tiny-shapes/`, about 15 MB) in the exact original release
layout and loads through the same loader as the real checkpoints.

`wan-tiny` names a second, untrained model: the same tiny layout with seeded random weights (the
`wan-tiny` preset), written on first use to the user's cache. Its output is noise; tests and plumbing
benchmarks use it (through `write_random_checkpoint`) because it is smaller and its weights are
arbitrary on purpose.

Resolving a model (`resolve_model_path`) imports neither torch nor transformers, so the engine can name
the default model cheaply; only writing the random checkpoint imports them, inside the functions that do it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from models.wan.checkpoint import ORIGINAL_VAE_FILE
from models.wan.config import PRESETS, WAN_TINY, WanDiTConfig, WanVAEConfig

if TYPE_CHECKING:
    from transformers import UMT5Config

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "wan-tiny-shapes"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "tiny" / DEFAULT_MODEL_NAME
"""The shipped checkpoint of the default model (written by `python -m models.wan.tiny.train`)."""
RANDOM_MODEL_NAME = "wan-tiny"
# Bump when the generated random checkpoint changes, so stale caches are not reused.
_RANDOM_MODEL_VERSION = "random-v1"

TINY_VAE = WanVAEConfig(base_dim=16)
# Words of the synthetic shapes task the tiny model is meant for; other words map to <unk>.
TINY_VOCAB = (
    "a an the on in of and with moving move moves standing still static left right up down "
    "red green blue yellow orange purple white black gray grey background circle square triangle "
    "shape ball box video small large big"
).split()


def _cache_root() -> Path:
    return Path.home() / ".cache" / "smart-diffusion"


def tiny_t5_config(vocab_size: int, d_model: int) -> "UMT5Config":
    """The tiny umT5 encoder's config: 2 layers, 4 heads, the relative-position settings of umT5-XXL."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
        num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    )


def write_random_checkpoint(root: str | Path, *, dit: WanDiTConfig = WAN_TINY, vae: WanVAEConfig = TINY_VAE,
                            num_experts: int = 1, layout: str = "original", seed: int = 0,
                            vocab: tuple[str, ...] = TINY_VOCAB) -> Path:
    """Write a complete Wan checkpoint with seeded random weights (every parameter random).

    `layout` is "original" (Wan release files) or "diffusers"; two experts write Wan2.2 A14B's
    high/low-noise folders (or transformer/ + transformer_2/).
    """
    from transformers import UMT5EncoderModel

    from models.random_init import randomize_parameters
    from models.wan.text_encoder import WanTextEncoder
    from models.wan.tokenizer import build_word_tokenizer
    from models.wan.transformer import WanTransformer
    from models.wan.vae import WanVAE

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_word_tokenizer(vocab, Path(tmp) / "tokenizer")
    t5 = UMT5EncoderModel(tiny_t5_config(len(tokenizer), dit.text_dim))
    randomize_parameters(t5, seed=seed)
    WanTextEncoder(t5.eval(), tokenizer, text_len=dit.text_len).save_pretrained(root, layout=layout)

    vae_model = randomize_parameters(WanVAE(vae), seed=seed + 1)
    vae_target = root / ORIGINAL_VAE_FILE if layout == "original" else root / "vae"
    vae_model.save_pretrained(vae_target, layout=layout)

    if layout == "original":
        dirs = [root] if num_experts == 1 else [root / "high_noise_model", root / "low_noise_model"]
    else:
        dirs = [root / "transformer", root / "transformer_2"][:num_experts]
    for i, folder in enumerate(dirs):
        model = randomize_parameters(WanTransformer(dit), seed=seed + 2 + i)
        model.save_pretrained(folder, layout=layout)
    if layout == "diffusers":
        _write_model_index(root, num_experts)
    return root


def _write_model_index(root: Path, num_experts: int) -> None:
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],  # a word-level tokenizer, not umT5's
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if num_experts == 2 else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "boundary_ratio": 0.875 if num_experts == 2 else None,
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def default_model_path() -> Path:
    """The shipped default model's folder; a clear error when the installation lacks its files."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model {DEFAULT_MODEL_NAME!r} is missing from {DEFAULT_MODEL_DIR}; reinstall the "
            f"package (its data files hold the model) or rebuild it with `python -m models.wan.tiny.train --out "
            f"{DEFAULT_MODEL_DIR}`"
        )
    return DEFAULT_MODEL_DIR


def ensure_random_model(cache_root: Path | None = None) -> Path:
    """The random-weight `wan-tiny` model's folder, created once (atomically, so concurrent first runs are safe)."""
    target = (cache_root or _cache_root()) / f"{RANDOM_MODEL_NAME}-{_RANDOM_MODEL_VERSION}"
    if (target / "config.json").is_file():
        return target
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("creating the random-weight %s model in %s", RANDOM_MODEL_NAME, target)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        with torch.random.fork_rng():
            write_random_checkpoint(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(path_or_name: str | Path | None) -> Path:
    """A checkpoint folder for a path, or for a bundled model's name: None or `wan-tiny-shapes` (the trained
    default, shipped with the package), `wan-tiny` (random weights, created in the user's cache)."""
    if path_or_name is None or str(path_or_name) == DEFAULT_MODEL_NAME:
        return default_model_path()
    if str(path_or_name) == RANDOM_MODEL_NAME:
        return ensure_random_model()
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    bundled = f"{DEFAULT_MODEL_NAME!r} or {RANDOM_MODEL_NAME!r}"
    if str(path_or_name) in PRESETS:
        raise ValueError(
            f"{path_or_name!r} names a model whose weights must be downloaded first; pass the checkpoint "
            f"folder (original Wan release or *-Diffusers layout) instead, or {bundled}"
        )
    raise ValueError(f"model {str(path_or_name)!r} is neither a folder nor {bundled}")
