"""Rotary position embeddings: 1-D, and multi-axis (M-RoPE and STARFlow-style sections).

Every variant is one table: for rotary pair i a frequency `freqs[i]` and the position axis
`axis_of_pair[i]` that drives it; angle = positions[..., axis_of_pair[i]] * freqs[i].
- 1-D: one axis, freqs theta^(-2i/head_dim).
- M-RoPE (Qwen2.5-VL): the global 1-D frequencies; consecutive pair ranges (`sections`) are driven
  by the temporal / height / width position axes.
- sectioned (STARFlow): each section has its own table theta^(-k/n_section), so every axis sees
  the full frequency range.
Pairs are either half-split (rotate_half, HF/Qwen) or interleaved (channels 2i, 2i+1; STARFlow).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rope_1d(head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return freqs.astype(np.float32), np.zeros(head_dim // 2, np.int32)


def rope_mrope(
    head_dim: int, sections: Sequence[int], theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    if sum(sections) != head_dim // 2:
        raise ValueError(
            f"mrope sections {tuple(sections)} must sum to head_dim/2 = {head_dim // 2}"
        )
    freqs, _ = rope_1d(head_dim, theta)
    return freqs, np.repeat(np.arange(len(sections)), sections).astype(np.int32)


def rope_sectioned(
    sections: Sequence[int], theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    freqs = [theta ** (-np.arange(n, dtype=np.float64) / n) for n in sections]
    axes = np.repeat(np.arange(len(sections)), sections)
    return np.concatenate(freqs).astype(np.float32), axes.astype(np.int32)


def rope_angles(positions: jax.Array, freqs: np.ndarray, axis_of_pair: np.ndarray):
    """positions (B, L) for one axis or (B, L, A) -> (cos, sin), each (B, L, pairs)."""
    pos = positions.astype(jnp.float32)
    if pos.ndim == 2:
        pos = pos[..., None]
    ang = pos[..., np.asarray(axis_of_pair)] * jnp.asarray(freqs)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleaved: bool) -> jax.Array:
    """x (B, L, H, Dh) rotated by (cos, sin) of shape (B, L, Dh/2); computed in fp32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(dtype)
