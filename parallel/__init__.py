"""Context parallelism (Ulysses, Ring, hybrid), CFG parallelism and patch-parallel VAE decode: pure torch.distributed."""
