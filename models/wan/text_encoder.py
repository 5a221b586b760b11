"""Wan's text encoder: the umT5-XXL encoder plus its tokenizer and prompt cleaning (docs/wan-model.md).

The network is transformers' `UMT5EncoderModel`, which computes exactly what Wan's own
`wan/modules/t5.py` computes (per-layer relative position bias, no 1/sqrt(d) scaling, RMS norm,
gated-gelu FFN; checked against an independent re-implementation in the tests), so no encoder code
is written here. This module adds what Wan does around it:

1. read a checkpoint in either layout, original (`models_t5_umt5-xxl-enc-bf16.pth` in Wan key names,
   tokenizer in `google/umt5-xxl/`) or diffusers (`text_encoder/` + `tokenizer/`), and load it strictly;
2. clean, tokenise (EOS appended, padded to `text_len`), encode all positions with the pad keys masked;
3. cut every output to its real length (tokens incl. EOS): the DiT zero-pads it back itself.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path
from typing import Callable, Literal, Sequence, TypeVar

import ftfy
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from models.conditioning import Conditioning
from models.loading import (
    CheckpointError,
    check_keys,
    StateDict,
    load_safetensors_dir,
    load_safetensors_file,
    load_strict,
    load_torch_file,
    meta_device,
    save_safetensors_sharded,
)
from models.wan.t5_keys import (
    HF_EMBED_TOKENS,
    HF_SHARED,
    WAN_EMBEDDING,
    transformers_to_wan_t5,
    umt5_config_from_wan_state_dict,
    wan_t5_to_transformers,
)

logger = logging.getLogger(__name__)

# Original release layout (Wan-AI/Wan2.x-T2V-*).
ORIGINAL_WEIGHTS = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER = "google/umt5-xxl"
# diffusers layout (Wan-AI/Wan2.x-T2V-*-Diffusers).
DIFFUSERS_ENCODER = "text_encoder"
DIFFUSERS_TOKENIZER = "tokenizer"
DIFFUSERS_WEIGHTS_STEM = "model"

Layout = Literal["original", "diffusers"]
T = TypeVar("T")

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (`basic_clean` + `whitespace_clean`; diffusers' `prompt_clean` is the same).

    Fixes mojibake with ftfy, unescapes HTML twice (prompts are often double-escaped), collapses
    whitespace runs to one space and strips, so equivalent prompts give the same tokens.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class WanTextEncoder:
    """umT5 encoder + tokenizer with Wan's cleaning, padding and length cut.

    `model` is a `UMT5EncoderModel` in eval mode; `tokenizer` must append EOS and pad with the
    token whose mask is 0 (umT5: pad 0, EOS 1). `text_len` is the padded length every prompt is
    encoded at (512 in the release; prompts longer than that are truncated, EOS kept).
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = 512) -> None:
        if text_len < 1:
            raise ValueError(f"text_len ({text_len}) must be at least 1; the release uses 512")
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the encoder's embedding only {model.config.vocab_size} "
                "rows; pair the encoder with the tokenizer it was trained with"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.text_len = text_len

    # ---- construction ----
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        text_len: int = 512,
    ) -> "WanTextEncoder":
        """Load from a checkpoint root in the original or the diffusers layout (original wins if both)."""
        root = Path(path)
        original = root / ORIGINAL_WEIGHTS
        diffusers = root / DIFFUSERS_ENCODER
        if original.is_file():
            return cls.from_files(original, root / ORIGINAL_TOKENIZER, dtype=dtype, device=device, text_len=text_len)
        if (diffusers / "config.json").is_file():
            return cls.from_files(
                diffusers, root / DIFFUSERS_TOKENIZER, dtype=dtype, device=device, text_len=text_len
            )
        raise CheckpointError(
            f"{root} holds neither {ORIGINAL_WEIGHTS} (original layout) nor {DIFFUSERS_ENCODER}/config.json "
            "(diffusers layout); pass the checkpoint root, or use WanTextEncoder.from_files"
        )

    @classmethod
    def from_files(
        cls,
        weights_path: str | Path,
        tokenizer_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        text_len: int = 512,
        config: UMT5Config | None = None,
    ) -> "WanTextEncoder":
        """Load from explicit paths.

        `weights_path` is a `.pth`/`.safetensors` file in Wan or transformers key names, or a
        transformers model folder (`config.json` + `model.safetensors` or its shards). The config comes
        from `config`, else the folder's `config.json`, else the tensor shapes (Wan's `.pth` has none).
        """
        tokenizer = load_tokenizer(tokenizer_dir)  # first: it is cheap, the weights are not
        weights_path = Path(weights_path)
        if weights_path.is_dir():
            sd, source = load_safetensors_dir(weights_path, stem=DIFFUSERS_WEIGHTS_STEM)
            if config is None:
                if not (weights_path / "config.json").is_file():
                    raise CheckpointError(f"{weights_path} has no config.json; pass config= explicitly")
                config = UMT5Config.from_pretrained(str(weights_path), local_files_only=True)
        else:
            source = str(weights_path)
            if weights_path.suffix == ".safetensors":
                sd = load_safetensors_file(weights_path)
            else:
                sd = load_torch_file(weights_path)
        if config is None:
            wan_sd = sd if WAN_EMBEDDING in sd else _mapped(transformers_to_wan_t5, sd, source)
            config = _mapped(umt5_config_from_wan_state_dict, wan_sd, source)
        model = _load_model(config, sd, source, dtype=dtype, device=device)
        logger.info(
            "umT5 encoder loaded from %s (%d layers, d_model %d, %s on %s), tokenizer from %s",
            source, config.num_layers, config.d_model, dtype, device, tokenizer_dir,
        )
        return cls(model, tokenizer, text_len=text_len)

    # ---- properties ----
    @property
    def dim(self) -> int:
        """Width of every output row (4096 for umT5-XXL = the DiT's text_dim)."""
        return int(self.model.config.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    # ---- encoding ----
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts as `ids, mask`, both (B, text_len) int64 on the CPU; EOS appended, pads masked 0."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string; wrap it as [prompt]")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            add_special_tokens=True,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One (L_i, dim) tensor per prompt, L_i = its token count incl. EOS (≤ text_len).

        All prompts run in one forward over the full `text_len` positions with pad keys masked, as in
        Wan; rows past L_i are dropped (they are non-zero and must not reach the DiT). Outputs are in the
        model's dtype on its device (Wan also keeps the encoder dtype, bf16 in the release), each a
        separate contiguous tensor so one can be sent on without the whole batch.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string; wrap it as [prompt]")
        if len(prompts) == 0:
            return []
        ids, mask = self.tokenize(prompts)
        hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n].clone() for h, n in zip(hidden, lengths)]

    def conditioning(self, prompts: Sequence[str]) -> list[Conditioning]:
        """`encode` as the family-neutral conditioning (Wan's is the sequence alone), CPU float32."""
        return [Conditioning(e.detach().to("cpu", torch.float32)) for e in self.encode(prompts)]

    # ---- saving ----
    def wan_state_dict(self) -> StateDict:
        """The encoder weights in Wan key names (what `models_t5_umt5-xxl-enc-bf16.pth` holds)."""
        return transformers_to_wan_t5(self.model.state_dict())

    def save_pretrained(
        self, root: str | Path, layout: Layout = "original", max_shard_bytes: int | None = None
    ) -> None:
        """Write weights and tokenizer under `root` so that `from_pretrained(root)` reads them back.

        original: `models_t5_umt5-xxl-enc-bf16.pth` (Wan key names, torch.save) + `google/umt5-xxl/`;
        diffusers: `text_encoder/` (config.json + model.safetensors, sharded above `max_shard_bytes`)
        + `tokenizer/`. Weights keep the model's current dtype (the file name is the release's, whatever
        the dtype). The tied embedding is written once (as `shared.weight` in the diffusers layout,
        like transformers' own `save_pretrained`).
        """
        if layout not in ("original", "diffusers"):
            raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
        shared, embed = self.model.shared.weight, self.model.encoder.embed_tokens.weight
        if shared is not embed and not torch.equal(shared, embed):
            raise ValueError(
                "shared.weight and encoder.embed_tokens.weight differ, but both layouts store one tied embedding; "
                "tie them (model.encoder.embed_tokens = model.shared) before saving"
            )
        root = Path(root)
        if layout == "original":
            root.mkdir(parents=True, exist_ok=True)
            sd = {k: v.detach().to("cpu").contiguous() for k, v in self.wan_state_dict().items()}
            torch.save(sd, root / ORIGINAL_WEIGHTS)
            self.tokenizer.save_pretrained(str(root / ORIGINAL_TOKENIZER))
        else:
            folder = root / DIFFUSERS_ENCODER
            folder.mkdir(parents=True, exist_ok=True)
            self.model.config.save_pretrained(str(folder))
            sd = {k: v.detach().to("cpu") for k, v in self.model.state_dict().items() if k != HF_EMBED_TOKENS}
            save_safetensors_sharded(sd, folder, stem=DIFFUSERS_WEIGHTS_STEM, max_shard_bytes=max_shard_bytes)
            self.tokenizer.save_pretrained(str(root / DIFFUSERS_TOKENIZER))
        logger.info("text encoder saved to %s (%s layout)", root, layout)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """`AutoTokenizer` from a local folder only (never the Hub), with a clear error when it is absent."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a tokenizer from {folder}: {exc}") from exc


def _mapped(fn: Callable[[StateDict], T], sd: StateDict, source: str) -> T:
    """Apply a key map or config reader, naming the file when it rejects the state dict."""
    try:
        return fn(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def _check_wan_keys(model: UMT5EncoderModel, sd: StateDict, source: str) -> None:
    """Report missing / unexpected / mis-shaped keys of a Wan-named checkpoint in Wan's own names.

    `load_strict` would report them too, but in transformers names, which a user holding Wan's
    `.pth` cannot look up in the file.
    """
    expected = transformers_to_wan_t5(model.state_dict(keep_vars=True))
    check_keys(expected, sd, source, "the umT5 encoder (Wan key names)")


def _load_model(
    config: UMT5Config, sd: StateDict, source: str, dtype: torch.dtype, device: torch.device | str
) -> UMT5EncoderModel:
    """Build the encoder on meta and load `sd` (Wan or transformers key names) strictly, keeping the tie.

    The token embedding is the largest tensor (256384 x 4096); it is cast once and the same tensor
    is given under both tied names, then the modules are re-tied, so it is never held twice.
    """
    with meta_device():
        model = UMT5EncoderModel(config)
    if WAN_EMBEDDING in sd:
        _check_wan_keys(model, sd, source)
        sd = wan_t5_to_transformers(sd)
    sd = dict(sd)
    if HF_SHARED in sd and HF_EMBED_TOKENS in sd and sd[HF_SHARED] is not sd[HF_EMBED_TOKENS]:
        if sd[HF_SHARED].shape == sd[HF_EMBED_TOKENS].shape and not torch.equal(sd[HF_SHARED], sd[HF_EMBED_TOKENS]):
            raise CheckpointError(
                f"{source}: {HF_SHARED} and {HF_EMBED_TOKENS} differ, but the encoder ties them; "
                "drop one of them from the checkpoint"
            )
    embedding = sd.get(HF_SHARED, sd.get(HF_EMBED_TOKENS))
    if embedding is not None:
        embedding = embedding.to(device=device, dtype=dtype)
        sd[HF_SHARED] = sd[HF_EMBED_TOKENS] = embedding
    load_strict(model, sd, source, dtype=dtype, device=device)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model
