"""The FAE: representation encoders, the autoencoder, its weights file. `load(path)` rebuilds an
FAE from its fae.safetensors alone (`pretzel_jax.fae.load`)."""

from pretzel_jax.fae.load import load

__all__ = ["load"]
