"""The training recipe of the embedded default model (`wan-tiny-shapes`): one seeded command.

    .venv/bin/python -m models.wan.tiny.train --out models/wan/tiny/wan-tiny-shapes

It trains, with the project's own classes and on the synthetic task of `models.wan.tiny.shapes`:

1. the text side: a word tokenizer over the task's vocabulary and a tiny umT5 encoder
   (`transformers.UMT5EncoderModel`), seeded and frozen (its random embeddings are distinct per word
   and position, which is all the DiT needs), rounded to bf16 as the release file name says;
2. the Wan VAE (`WanVAE`, base_dim 16, one residual block per level) as an autoencoder on rendered
   clips, through the same causal chunked encode and frame-by-frame decode as inference, with a
   pixel L1 + L2 loss (shape pixels weighted up) and latent noise (so the decoder tolerates the DiT's
   errors). Afterwards its
   posterior is rescaled per channel so that Wan's fixed latent normalisation (the Wan2.1 latents_mean /
   latents_std, which the original layout does not store) gives zero-mean, unit-variance latents: an
   exact reparametrisation of the 1x1x1 convs `conv1` (posterior) and `conv2` (decoder input);
3. the DiT (`WanTransformer`, the `wan-tiny-shapes` preset) with rectified flow matching on the VAE
   latents of freshly rendered clips: x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0,
   timestep = 1000 sigma (the samplers' convention, stages/samplers.py), sigma logit-normal then
   shifted as the sampler's shift 3 does (sigma' = 3 sigma / (1 + 2 sigma)): without the shift, the high
   noise levels where the shape's path is decided are rarely drawn, and 5,000 steps gave the right colour
   but a random motion direction (13-17%; 100% with the shift, lr 1e-3 and 9,000 steps); the
   prompt is replaced by an unconditional text (Wan's default negative prompt, which the pipeline
   feeds the unconditional branch, or "") 10% of the time, so classifier-free guidance works;
   the saved weights are an exponential moving average.

The result is written in the original Wan release layout (config.json +
diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth,
google/umt5-xxl/) with each class's own `save_pretrained`, plus `training_record.json` (arguments,
wall times, losses, sizes). Everything is seeded; on the same machine and thread count a rerun gives
the same files. Small values of the step/clip flags give a quick smoke run (the tests do that).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import UMT5EncoderModel

from models.wan.config import WAN_DEFAULT_NEGATIVE_PROMPT, WAN_TINY_SHAPES, WanDiTConfig, WanVAEConfig
from models.wan.default_model import TINY_VOCAB, tiny_t5_config
from models.wan.text_encoder import WanTextEncoder
from models.wan.tiny import shapes
from models.wan.tokenizer import build_word_tokenizer
from models.wan.transformer import WanTransformer
from models.wan.vae import AttentionBlock, FeatureCache, Resample, ResidualBlock, WanVAE

logger = logging.getLogger("models.wan.tiny.train")

TINY_SHAPES_VAE = WanVAEConfig(base_dim=16, num_res_blocks=1)
"""The default model's VAE: Wan2.1's layout (strides 4 x 8 x 8, z_dim 16) at 1/6 of the width."""

NULL_PROMPTS = (WAN_DEFAULT_NEGATIVE_PROMPT, "")
"""Texts of the unconditional branch: what the pipeline sends when guided (Wan's default negative prompt), or ""."""


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the recipe (the command-line flags); the defaults are the shipped model's."""

    seed: int = 0
    threads: int = 2
    # VAE
    vae_base_dim: int = TINY_SHAPES_VAE.base_dim
    vae_res_blocks: int = TINY_SHAPES_VAE.num_res_blocks
    vae_steps: int = 1500
    vae_lr: float = 1e-3
    vae_latent_noise: float = 0.05
    vae_fg_weight: float = 3.0
    vae_eval_clips: int = 30
    # data for the DiT
    clips: int = 1800
    # DiT
    dit_dim: int = WAN_TINY_SHAPES.dim
    dit_ffn_dim: int = WAN_TINY_SHAPES.ffn_dim
    dit_heads: int = WAN_TINY_SHAPES.num_heads
    dit_layers: int = WAN_TINY_SHAPES.num_layers
    dit_steps: int = 9000
    dit_batch: int = 32
    dit_lr: float = 1e-3
    dit_ema: float = 0.999
    dit_sigma_shift: float = 3.0
    null_prob: float = 0.1
    # reuse a trained Wan2.1_VAE.pth instead of stage 2 (e.g. to retrain only the DiT); "" trains one
    vae_from: str = ""

    def dit_config(self) -> WanDiTConfig:
        return WanDiTConfig(dim=self.dit_dim, ffn_dim=self.dit_ffn_dim, num_heads=self.dit_heads,
                            num_layers=self.dit_layers, freq_dim=WAN_TINY_SHAPES.freq_dim,
                            text_dim=WAN_TINY_SHAPES.text_dim, text_len=WAN_TINY_SHAPES.text_len)

    def vae_config(self) -> WanVAEConfig:
        return WanVAEConfig(base_dim=self.vae_base_dim, num_res_blocks=self.vae_res_blocks)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# 1. Text: tokenizer + frozen tiny umT5
# ---------------------------------------------------------------------------------------------
def build_text_encoder(out: Path, text_dim: int, text_len: int, seed: int) -> WanTextEncoder:
    """Write the tokenizer and a seeded umT5 encoder (bf16 file) under `out`; return it loaded back in fp32."""
    tokenizer = build_word_tokenizer(TINY_VOCAB, out / "google" / "umt5-xxl")
    torch.manual_seed(seed)
    t5 = UMT5EncoderModel(tiny_t5_config(len(tokenizer), text_dim)).eval()
    t5.encoder.embed_tokens = t5.shared  # one tied embedding, as both layouts store it
    WanTextEncoder(t5.to(torch.bfloat16), tokenizer, text_len=text_len).save_pretrained(out, layout="original")
    # What the pipeline will load: the bf16 file read back in fp32.
    return WanTextEncoder.from_pretrained(out, dtype=torch.float32, text_len=text_len)


# ---------------------------------------------------------------------------------------------
# 2. VAE
# ---------------------------------------------------------------------------------------------
def vae_posterior_mean(vae: WanVAE, video: torch.Tensor) -> torch.Tensor:
    """Differentiable twin of `WanVAE.encode` before normalisation: (B, 3, 4n+1, H, W) -> raw mu (B, z, n+1, h, w).

    The same causal chunks ([0:1], [1:5], ...) through one FeatureCache as the inference encode.
    """
    ts = vae.config.temporal_stride
    cache = FeatureCache()
    chunks = [video[:, :, :1]] + [video[:, :, i:i + ts] for i in range(1, video.shape[2], ts)]
    out = torch.cat([vae.encoder(chunk, cache) for chunk in chunks], dim=2)
    return vae.conv1(out).chunk(2, dim=1)[0]


def vae_decode_raw(vae: WanVAE, mu: torch.Tensor) -> torch.Tensor:
    """Differentiable twin of `WanVAE.decode` from raw mu: (B, z, T, h, w) -> unclamped pixels (B, 3, 4T-3, 8h, 8w)."""
    x = vae.conv2(mu)
    cache = FeatureCache()
    return torch.cat([vae.decode_step(x[:, :, i:i + 1], cache) for i in range(x.shape[2])], dim=2)


VAE_PHASES = ((0.35, 16, 1, 32), (0.55, 8, 5, 32), (0.10, 2, 9, 64))
"""VAE curriculum: (fraction of the steps, clips per batch, frames, crop side). Single frames first (the
spatial code is most of the work and they are cheap), then 5-frame clips (the first, single-frame chunk
and one causal continuation), both as 32 x 32 crops around the shape at the native scale, then full
9-frame 64 x 64 clips (three chunks; the mid-block attention at the size it sees at inference)."""


def _vae_phase(step: int, total: int) -> tuple[int, int, int]:
    """(clips, frames, crop) of VAE step `step` out of `total`."""
    end = 0.0
    for fraction, count, frames, crop in VAE_PHASES:
        end += fraction
        if step < end * total:
            return count, frames, crop
    return VAE_PHASES[-1][1:]


def _vae_batch(count: int, frames: int, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` rendered clips of `frames` frames (a random window of a 17-frame clip), cropped to crop x crop
    around the shape (randomly offset, so it may be cut) unless crop is the full frame; colours jittered a little."""
    specs = shapes.all_specs()
    videos = []
    for _ in range(count):
        spec = specs[int(rng.integers(len(specs)))]
        video = shapes.sample_video(spec, rng, colour_jitter=0.05)
        start = int(rng.integers(0, shapes.NUM_FRAMES - frames + 1))
        video = video[start:start + frames]
        if crop < shapes.HEIGHT:
            ys, xs = np.nonzero((video[0] < 0.98).any(axis=-1))
            corner = []
            for centre, extent in ((ys.mean(), shapes.HEIGHT), (xs.mean(), shapes.WIDTH)):
                offset = int(rng.integers(-crop // 4, crop // 4 + 1))
                corner.append(int(np.clip(round(centre) - crop // 2 + offset, 0, extent - crop)))
            video = video[:, corner[0]:corner[0] + crop, corner[1]:corner[1] + crop]
        videos.append(video)
    return shapes.to_model_video(np.stack(videos))


@torch.no_grad()
def init_vae(vae: WanVAE) -> WanVAE:
    """An initialisation that starts as a per-frame, variance-preserving 2D autoencoder with sample-and-hold in time.

    From PyTorch's default init, the deep narrow Wan VAE learns far too slowly for the time budget: every
    conv shrinks the signal (~0.6x) while its random bias does not, so after a dozen layers the input is
    buried under bias noise, and the random residual branches add more. Here every conv is N(0, 1/fan_in)
    with a zero bias, every residual block and attention block starts as the identity (last conv / output
    projection zeroed, as in Fixup / zero-init residual training), every 3x3x3 causal conv sees only its
    current frame (the two past taps zeroed), and the temporal resamplers copy frames: the encoder's
    strided `time_conv` keeps the newest frame of each window, the decoder's `time_conv` repeats each frame
    into both output frames. The decoder's output bias starts at white, the background (Adam moves a bias
    by about the learning rate per step). Training learns everything else, the temporal part included.
    """
    for module in vae.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            weight = module.weight
            if weight.ndim == 5 and weight.shape[2] == 3 and weight.shape[3] == 3:  # causal 3x3x3: current frame only
                weight.zero_()
                fan_in = weight.shape[1] * 9
                weight[:, :, 2].normal_(0.0, fan_in**-0.5)
            else:
                weight.normal_(0.0, weight[0].numel() ** -0.5)
            module.bias.zero_()
    for module in vae.modules():
        if isinstance(module, ResidualBlock):
            module.residual[-1].weight.zero_()
        elif isinstance(module, AttentionBlock):
            module.proj.weight.zero_()
        elif isinstance(module, Resample) and hasattr(module, "time_conv"):
            w = module.time_conv.weight  # (C_out, C, 3, 1, 1)
            w.zero_()
            channels = w.shape[1]
            eye = torch.eye(channels)
            for half in range(w.shape[0] // channels):
                w[half * channels:(half + 1) * channels, :, -1, 0, 0] = eye
    vae.decoder.head[-1].bias.fill_(1.0)
    return vae


def train_vae(cfg: TrainConfig, rng: np.random.Generator) -> tuple[WanVAE, list[float]]:
    torch.manual_seed(cfg.seed + 1)
    vae = init_vae(WanVAE(cfg.vae_config())).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, min(50, cfg.vae_steps // 10))
    losses: list[float] = []
    bar = tqdm(range(cfg.vae_steps), desc="VAE", unit="step", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, warmup)
        video = _vae_batch(*_vae_phase(step, cfg.vae_steps), rng)
        mu = vae_posterior_mean(vae, video)
        scale = mu.detach().std(dim=(0, 2, 3, 4), keepdim=True)  # per channel: noise relative to the latent
        z = mu + cfg.vae_latent_noise * scale * torch.randn_like(mu)
        recon = vae_decode_raw(vae, z)
        # the shape covers ~10% of a frame: its pixels (anything not white) weigh 1 + vae_fg_weight
        weight = 1 + cfg.vae_fg_weight * (video < 0.98).any(dim=1, keepdim=True).float()
        err = recon - video
        loss = (weight * (err.abs() + err.square())).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
    return vae.eval(), losses


@torch.no_grad()
def normalise_vae(vae: WanVAE, videos: torch.Tensor) -> dict[str, list[float]]:
    """Rescale the posterior per channel so that `WanVAE.encode` (with the fixed Wan2.1 mean/std) of these
    videos gives zero mean and unit std per channel; the decoder input conv undoes the rescaling exactly.

    With raw mu of channel c having mean m and std s, the new posterior mean is mu' = a mu + b with
    a = S / s, b = M - S m / s (M, S: Wan's latents_mean/std), so (mu' - M) / S = (mu - m) / s. The
    log-variance half of conv1 moves by 2 log a; conv2 sees mu' and maps it back through (mu' - b) / a.
    """
    mus = torch.cat([vae_posterior_mean(vae, videos[i:i + 8]) for i in range(0, len(videos), 8)])
    m = mus.mean(dim=(0, 2, 3, 4)).double()
    s = mus.std(dim=(0, 2, 3, 4)).double().clamp_min(1e-6)
    big_m = torch.tensor(vae.config.latents_mean, dtype=torch.float64)
    big_s = torch.tensor(vae.config.latents_std, dtype=torch.float64)
    a = big_s / s
    b = big_m - big_s * m / s
    z = vae.config.z_dim
    w1, b1 = vae.conv1.weight.double(), vae.conv1.bias.double()  # (2z, 2z, 1, 1, 1), (2z,)
    w1[:z] *= a.view(-1, 1, 1, 1, 1)
    b1[:z] = a * b1[:z] + b
    b1[z:] += 2 * torch.log(a)
    w2, b2 = vae.conv2.weight.double(), vae.conv2.bias.double()  # (z, z, 1, 1, 1), (z,)
    b2 = b2 - (w2[:, :, 0, 0, 0] * (b / a)).sum(dim=1)
    w2 = w2 / a.view(1, -1, 1, 1, 1)
    for param, value in ((vae.conv1.weight, w1), (vae.conv1.bias, b1), (vae.conv2.weight, w2), (vae.conv2.bias, b2)):
        param.copy_(value.to(param.dtype))
    return {"raw_mean": m.tolist(), "raw_std": s.tolist()}


# ---------------------------------------------------------------------------------------------
# 3. DiT
# ---------------------------------------------------------------------------------------------
def init_dit(model: WanTransformer) -> WanTransformer:
    """Wan's `init_weights`: Xavier-uniform linears with zero biases, N(0, 0.02) text/time MLPs, zero head."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                torch.nn.init.zeros_(module.bias)
        torch.nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
        for seq in (model.text_embedding, model.time_embedding):
            for module in seq:
                if isinstance(module, torch.nn.Linear):
                    torch.nn.init.normal_(module.weight, std=0.02)
        torch.nn.init.zeros_(model.head.head.weight)
    return model


@torch.no_grad()
def encode_dataset(vae: WanVAE, count: int, rng: np.random.Generator,
                   batch: int = 16) -> tuple[torch.Tensor, list[int]]:
    """`count` rendered clips (17 x 64 x 64) encoded by the saved VAE: latents (N, 16, 5, 8, 8) and spec indices.

    The specs cycle through every combination, so each prompt has count / 90 clips.
    """
    specs = shapes.all_specs()
    latents, labels = [], []
    for start in tqdm(range(0, count, batch), desc="encode", unit="batch", mininterval=5):
        ids = [(start + i) % len(specs) for i in range(min(batch, count - start))]
        videos = np.stack([shapes.sample_video(specs[i], rng) for i in ids])
        latents.append(vae.encode(shapes.to_model_video(videos)))
        labels += ids
    return torch.cat(latents), labels


def train_dit(cfg: TrainConfig, latents: torch.Tensor, labels: list[int], prompt_emb: list[torch.Tensor],
              null_emb: list[torch.Tensor], rng: np.random.Generator) -> tuple[WanTransformer, list[float]]:
    torch.manual_seed(cfg.seed + 2)
    model = init_dit(WanTransformer(cfg.dit_config())).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dit_lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, min(200, cfg.dit_steps // 10))
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    losses: list[float] = []
    bar = tqdm(range(cfg.dit_steps), desc="DiT", unit="step", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.dit_lr * _lr_factor(step, cfg.dit_steps, warmup)
        idx = rng.integers(len(latents), size=cfg.dit_batch)
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(cfg.dit_batch, generator=gen))  # logit-normal, then Wan's shift
        sigma = cfg.dit_sigma_shift * sigma / (1 + (cfg.dit_sigma_shift - 1) * sigma)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        drop = rng.random(cfg.dit_batch) < cfg.null_prob
        context = [null_emb[int(rng.integers(len(null_emb)))] if d else prompt_emb[labels[i]]
                   for i, d in zip(idx, drop)]
        v = model(x_t, sigma * 1000, context)
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.dit_ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return ema, losses


# ---------------------------------------------------------------------------------------------
# Evaluation helpers and the recipe
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_accuracy(vae: WanVAE, clips: int, rng: np.random.Generator) -> dict[str, float]:
    """Detector accuracy on VAE reconstructions of rendered clips: the ceiling of the generated videos'."""
    specs = shapes.all_specs()
    hits = {"colour": 0, "shape": 0, "direction": 0, "all": 0}
    for i in range(clips):
        spec = specs[int(rng.integers(len(specs)))]
        recon = vae.decode(vae.encode(shapes.to_model_video(shapes.sample_video(spec, rng))))[0]
        for key, hit in shapes.detect(recon).matches(spec).items():
            hits[key] += int(hit)
    return {k: v / max(1, clips) for k, v in hits.items()}


def _megabytes(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 3)


def train(cfg: TrainConfig, out: str | Path) -> dict:
    """Run the whole recipe and write the checkpoint (original Wan layout) to `out`; returns the record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    times: dict[str, float] = {}
    start = time.perf_counter()
    record: dict = {"config": asdict(cfg), "command": " ".join(["python -m models.wan.tiny.train", *sys.argv[1:]])}

    # 1. text encoder and tokenizer
    mark = time.perf_counter()
    dit_cfg = cfg.dit_config()
    encoder = build_text_encoder(out, dit_cfg.text_dim, dit_cfg.text_len, cfg.seed)
    specs = shapes.all_specs()
    prompt_emb = encoder.encode([s.prompt for s in specs])
    null_emb = encoder.encode(list(NULL_PROMPTS))
    times["text_encoder_s"] = time.perf_counter() - mark

    # 2. VAE, normalised, saved, and read back as the pipeline will
    mark = time.perf_counter()
    rng = np.random.default_rng(cfg.seed + 10)
    if cfg.vae_from:
        vae, vae_losses = copy.deepcopy(WanVAE.from_pretrained(cfg.vae_from)), []  # in memory: `out` may hold it
        logger.info("VAE from %s (not trained here)", cfg.vae_from)
    else:
        vae, vae_losses = train_vae(cfg, rng)
    norm_videos = shapes.to_model_video(np.stack([shapes.sample_video(specs[i % len(specs)], rng)
                                                  for i in range(max(4, min(96, cfg.clips)))]))
    record["vae_normalisation"] = normalise_vae(vae, norm_videos)
    vae.save_pretrained(out / "Wan2.1_VAE.pth", layout="original")
    vae = WanVAE.from_pretrained(out / "Wan2.1_VAE.pth")
    times["vae_s"] = time.perf_counter() - mark
    if cfg.vae_eval_clips:
        mark = time.perf_counter()
        record["vae_reconstruction_accuracy"] = reconstruction_accuracy(vae, cfg.vae_eval_clips,
                                                                        np.random.default_rng(cfg.seed + 20))
        times["vae_eval_s"] = time.perf_counter() - mark
        logger.info("VAE reconstructions, detector accuracy: %s", record["vae_reconstruction_accuracy"])

    # 3. latents of fresh clips, then the DiT
    mark = time.perf_counter()
    latents, labels = encode_dataset(vae, cfg.clips, np.random.default_rng(cfg.seed + 30))
    record["latent_stats"] = {"mean": float(latents.mean()), "std": float(latents.std()),
                              "channel_std_min": float(latents.std(dim=(0, 2, 3, 4)).min()),
                              "channel_std_max": float(latents.std(dim=(0, 2, 3, 4)).max())}
    times["encode_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    dit, dit_losses = train_dit(cfg, latents, labels, prompt_emb, null_emb, np.random.default_rng(cfg.seed + 40))
    dit.save_pretrained(out, layout="original")
    times["dit_s"] = time.perf_counter() - mark
    times["total_s"] = time.perf_counter() - start

    def tail(losses: list[float]) -> float | None:
        return float(np.mean(losses[-100:])) if losses else None

    record.update({
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "vae_loss_final": tail(vae_losses), "dit_loss_final": tail(dit_losses),
        "vae_loss_curve": [round(float(np.mean(vae_losses[i:i + 50])), 5) for i in range(0, len(vae_losses), 50)],
        "dit_loss_curve": [round(float(np.mean(dit_losses[i:i + 250])), 5) for i in range(0, len(dit_losses), 250)],
        "parameters": {"dit": sum(p.numel() for p in dit.parameters()), "vae": sum(p.numel() for p in vae.parameters()),
                       "text_encoder": sum(p.numel() for p in encoder.model.parameters())},
        "megabytes": {"dit": _megabytes(out / "diffusion_pytorch_model.safetensors"),
                      "vae": _megabytes(out / "Wan2.1_VAE.pth"),
                      "text_encoder": _megabytes(out / "models_t5_umt5-xxl-enc-bf16.pth"),
                      "tokenizer": _megabytes(out / "google")},
        "machine": {"threads": cfg.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
    })
    (out / "training_record.json").write_text(json.dumps(record, indent=2))
    logger.info("wrote %s in %.0f s: %s", out, times["total_s"], record["seconds"])
    return record


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, Path]:
    parser = argparse.ArgumentParser(prog="python -m models.wan.tiny.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (original Wan layout)")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"default {value}")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return TrainConfig(**args), out


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, out = parse_args(argv)
    if out.exists() and any(out.iterdir()):
        logger.info("overwriting the checkpoint files in %s", out)
    train(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
