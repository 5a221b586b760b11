"""Networks with the exact math of their reference implementations, plus checkpoint loaders."""
