"""pretzel_jax: STARFlow2 in JAX/Flax. See README.md and DESIGN.md for the layout."""

__version__ = "0.1.0"
