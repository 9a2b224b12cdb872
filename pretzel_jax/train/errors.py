"""Errors a user can cause while training; each message names the thing and the fix."""


class ConfigError(ValueError):
    """An unknown config key or an impossible combination of settings."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored (corrupt, partial, or from a different model)."""


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""
