"""A deep-shallow flow over a latent image grid with an optional text-feature context prefix:
STARFlow's text-to-image model (and the shape ported ml-starflow checkpoints take).

Images are channels-last (B, H, W, C), patchified to raster tokens (channels (p1, p2, c)).
With `flow.rope == "sectioned"` the rotary positions follow STARFlow's rule: image slot (r, c)
-> (r * s, c * s[, 0]) with s = pt_seq_len / sqrt(h * w) (area-normalised, so other aspect
ratios keep the training scale), context token k -> (0, 0, k * pt_seq_len / L). Two position
axes without a text axis, three with one (the shallow blocks then get the image rows, text
axis 0). Angles belong to sequence slots, whatever permutation moved a token there.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.flow.config import FlowConfig
from pretzel_jax.flow.image_flow import patchify, unpatchify
from pretzel_jax.flow.stack import DeepShallowFlow, FlowOutput


@dataclasses.dataclass(frozen=True)
class LatentFlowConfig:
    flow: FlowConfig
    channels: int  # latent channels C
    grid: tuple[int, int]  # latent H, W
    patch_size: int = 1
    pt_seq_len: float | None = None  # RoPE scale reference; None = sqrt(tokens) (scale 1)
    context_len: int = 0  # trained caption length in tokens (0: unconditional)

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid))
        h, w = self.grid
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"LatentFlowConfig.grid {self.grid} is not divisible by patch {p}")
        if self.flow.token_dim != p * p * self.channels:
            raise ValueError(
                f"LatentFlowConfig: flow.token_dim must be patch_size^2 * channels = "
                f"{p * p * self.channels}, got {self.flow.token_dim}"
            )
        if self.flow.rope == "sectioned" and len(self.flow.rope_sections) not in (2, 3):
            raise ValueError(
                "LatentFlowConfig: sectioned RoPE needs 2 (row, col) or 3 (row, col, text) "
                f"sections, got {self.flow.rope_sections}"
            )

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.grid[0] // self.patch_size, self.grid[1] // self.patch_size

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (*self.grid, self.channels)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LatentFlowConfig:
        return cls(**{**d, "flow": FlowConfig(**d["flow"])})


def grid_text_positions(
    token_grid: tuple[int, int], *, pt_seq_len: float | None, context_len: int, axes: int
) -> np.ndarray:
    """STARFlow's RoPE positions (context_len + h*w, axes): context rows first, then raster."""
    h, w = token_grid
    mean_len = math.sqrt(h * w)
    scale = (pt_seq_len or mean_len) / mean_len
    r, c = np.meshgrid(np.arange(h) * scale, np.arange(w) * scale, indexing="ij")
    image = np.stack([r.ravel(), c.ravel()] + [np.zeros(h * w)] * (axes - 2), axis=-1)
    if axes == 2:
        if context_len:
            raise ValueError("2-axis RoPE has no text axis: use 3 rope sections with a context")
        return image.astype(np.float32)
    text = np.zeros((context_len, 3))
    text[:, 2] = np.arange(context_len) / max(context_len, 1) * (pt_seq_len or mean_len)
    return np.concatenate([text, image]).astype(np.float32)


class LatentFlow(nnx.Module):
    def __init__(self, config: LatentFlowConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.flow = DeepShallowFlow(config.flow, rngs=rngs)

    def positions(self, batch: int, context_len: int) -> jax.Array | None:
        cfg = self.config
        if cfg.flow.rope != "sectioned":
            return None
        pos = grid_text_positions(
            cfg.token_grid,
            pt_seq_len=cfg.pt_seq_len,
            context_len=context_len,
            axes=len(cfg.flow.rope_sections),
        )
        return jnp.broadcast_to(jnp.asarray(pos), (batch, *pos.shape))

    def tokens(self, x: jax.Array) -> jax.Array:
        return patchify(x, self.config.patch_size)

    def _context_len(self, context) -> int:
        return 0 if context is None else context.shape[1]

    def forward_all(self, x, context=None, context_mask=None) -> FlowOutput:
        """x (B, H, W, C) -> FlowOutput over raster tokens (B, N, p*p*C)."""
        pos = self.positions(x.shape[0], self._context_len(context))
        return self.flow.forward_all(self.tokens(x), context, context_mask, pos)

    def sample(
        self,
        noise,
        context=None,
        context_mask=None,
        *,
        guidance: float | jax.Array = 0.0,
        uncond_context=None,
        uncond_context_mask=None,
        guidance_rule: str = "product",
    ) -> jax.Array:
        """noise (B, H, W, C) -> latents (B, H, W, C); CFG in the deep block when
        `uncond_context` is given (STARFlow uses zeros of the context's shape)."""
        pos = self.positions(noise.shape[0], self._context_len(context))
        x = self.flow.inverse(
            self.tokens(noise),
            context,
            context_mask,
            pos,
            guidance=guidance,
            uncond_context=uncond_context,
            uncond_context_mask=uncond_context_mask,
            guidance_rule=guidance_rule,
        )
        return unpatchify(x, self.config.patch_size, self.config.image_shape)
