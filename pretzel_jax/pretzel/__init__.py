"""The Pretzel model: sequence layout -> two streams under one causal mask and one KV cache."""

from pretzel_jax.pretzel.config import STAGE_LOSSES, UNDERSTANDING_INPUTS, PretzelConfig
from pretzel_jax.pretzel.model import Pretzel, PretzelCache

__all__ = ["STAGE_LOSSES", "UNDERSTANDING_INPUTS", "Pretzel", "PretzelCache", "PretzelConfig"]
