"""The deep-shallow flow: shallow AF blocks (unconditional, local) then one deep AF block (the
only one that sees the context prefix and the only one guided), in data->noise order."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from pretzel_jax.flow.block import AFBlock
from pretzel_jax.flow.config import FlowConfig


class FlowOutput(NamedTuple):
    z: jax.Array  # (B, N, D) fp32
    logdet: jax.Array  # (B,) total log|det dz/dx| over tokens, dims and blocks
    block_outputs: tuple[jax.Array, ...]  # output of every block (the last is z)
    block_logdets: tuple[jax.Array, ...]


class DeepShallowFlow(nnx.Module):
    def __init__(self, config: FlowConfig, *, rngs: nnx.Rngs):
        self.config = config
        perms = config.block_permutations
        last = config.num_blocks - 1
        self.blocks = nnx.List(
            [
                AFBlock(
                    config, n, perms[i], conditioned=i == last and config.context_dim > 0, rngs=rngs
                )
                for i, n in enumerate(config.layers_per_block)
            ]
        )

    @property
    def deep(self) -> AFBlock:
        return self.blocks[-1]

    @staticmethod
    def _shallow_positions(positions, n):
        # Shallow blocks see only the image tokens: the last n slots of the deep block's positions.
        return None if positions is None else positions[:, positions.shape[1] - n :]

    def _check_tokens(self, x):
        chex.assert_rank(x, 3)
        chex.assert_axis_dimension(x, 2, self.config.token_dim)

    def forward_all(self, x, context=None, context_mask=None, positions=None) -> FlowOutput:
        self._check_tokens(x)
        n = x.shape[1]
        outputs, logdets = [], []
        h = x
        for block in self.blocks[:-1]:
            h, ld = block.forward(h, positions=self._shallow_positions(positions, n))
            outputs.append(h)
            logdets.append(ld)
        h, ld = self.deep.forward(h, context, context_mask, positions)
        outputs.append(h)
        logdets.append(ld)
        return FlowOutput(h, sum(logdets), tuple(outputs), tuple(logdets))

    def forward(self, x, context=None, context_mask=None, positions=None):
        """x (B, N, D) -> (z, logdet (B,)), logdet the total log|det dz/dx| per example."""
        out = self.forward_all(x, context, context_mask, positions)
        return out.z, out.logdet

    def inverse(
        self,
        z,
        context=None,
        context_mask=None,
        positions=None,
        *,
        guidance: float | jax.Array = 0.0,
        uncond_context=None,
        uncond_context_mask=None,
        guidance_rule: str = "product",
    ):
        """z -> x: the deep block first (guided when `uncond_context` is given), then the shallow
        blocks in reverse order, unguided. Sequential with KV caches; wrap in `jit` to compile
        once (the token loop is a `lax.scan`)."""
        self._check_tokens(z)
        n = z.shape[1]
        h = self.deep.inverse(
            z,
            context,
            context_mask,
            positions,
            guidance=guidance,
            uncond_context=uncond_context,
            uncond_context_mask=uncond_context_mask,
            guidance_rule=guidance_rule,
        )
        for block in reversed(self.blocks[:-1]):
            h = block.inverse(h, positions=self._shallow_positions(positions, n))
        return h.astype(jnp.float32)
