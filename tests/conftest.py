"""Shared pytest set-up: 8 fake CPU devices and parsed absl flags, before anything imports JAX."""

import os
import sys
from pathlib import Path

# The device count is fixed when the JAX backend starts, so this must precede `import jax`.
os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=8"])
)
os.environ["JAX_PLATFORMS"] = "cpu"
# Make `pretzel_jax` importable when pytest runs without an install (plain `pytest`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import absl.flags  # noqa: E402

# Grain's worker processes read absl flags; outside `absl.app.run` they are unparsed and raise
# UnparsedFlagAccessError.
absl.flags.FLAGS.mark_as_parsed()
