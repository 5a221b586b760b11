"""Wan2.1 / Wan2.2: DiT, VAE, umT5 text encoder, presets and checkpoint loaders."""
