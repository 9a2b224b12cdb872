"""Generic training machinery: config, mesh, optimizer, train state, steps, checkpoints, loop.

Entry points: `python -m pretzel_jax.train --config experiments/x.py` and `train(config, run_dir)`.
"""

from pretzel_jax.train.config import default_config, load_config
from pretzel_jax.train.errors import CheckpointError, ConfigError, NonFiniteError
from pretzel_jax.train.loop import train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "NonFiniteError",
    "default_config",
    "load_config",
    "train",
]
