"""Generic training machinery: config, mesh, optimizer, train state, steps, checkpoints, loop.

Entry points: `python -m pretzel_jax.train --config experiments/x.py` and `train(config, run_dir)`.
"""

from pretzel_jax.train.config import default_config, load_config
from pretzel_jax.train.errors import CheckpointError, ConfigError, NonFiniteError
from pretzel_jax.train.loop import train
from pretzel_jax.train.weights import WeightSource, load_safetensors, safetensors_source

__all__ = [
    "CheckpointError",
    "ConfigError",
    "NonFiniteError",
    "WeightSource",
    "default_config",
    "load_config",
    "load_safetensors",
    "safetensors_source",
    "train",
]
