"""Feature-cache strategies for the denoiser, hooked on the DiT's prepare/blocks/finalize protocol."""
