"""FLUX.1: DiT, VAE, CLIP-L + T5-XXL text encoders and presets (torch-free package entry)."""
