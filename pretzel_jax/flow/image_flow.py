"""A class-conditional (or unconditional) deep-shallow flow over image patches.

The first main job's model and the template for later latent-space flows: images of integer
levels -> [-1, 1] (uniform dequantisation for exact bits/dim, or Gaussian noise augmentation for
sample quality) -> patch tokens -> DeepShallowFlow with the class embedding as a one-token
context prefix of the deep block. Label dropout trains the unconditional model used by CFG
(the null class is an extra learned row of the table).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pretzel_jax.flow import likelihood, noise
from pretzel_jax.flow.config import FlowConfig
from pretzel_jax.flow.stack import DeepShallowFlow
from pretzel_jax.nn.sharding import param

NOISE_KINDS = ("uniform", "gaussian")


@dataclasses.dataclass(frozen=True)
class ImageFlowConfig:
    image_shape: tuple[int, int, int]  # H, W, C
    patch_size: int
    num_levels: int  # pixel values are integers in [0, num_levels)
    flow: FlowConfig
    num_classes: int = 0  # 0 = unconditional
    label_dropout: float = 0.1
    noise: str = "uniform"
    noise_std: float = 0.05  # for noise == "gaussian"
    latent_norm_reg: float = 1e-4

    def __post_init__(self):
        h, w, c = self.image_shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image_shape {self.image_shape} is not divisible by patch_size {p}")
        if self.flow.token_dim != p * p * c:
            raise ValueError(
                f"flow.token_dim must be patch_size^2 * channels = {p * p * c}, "
                f"got {self.flow.token_dim}"
            )
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if (self.num_classes > 0) != (self.flow.context_dim > 0):
            raise ValueError(
                "a class-conditional model (num_classes > 0) needs flow.context_dim > 0"
            )

    @property
    def num_tokens(self) -> int:
        h, w, _ = self.image_shape
        return (h // self.patch_size) * (w // self.patch_size)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), raster order, channels (p1, p2, c) as STARFlow."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(t: jax.Array, p: int, image_shape) -> jax.Array:
    h, w, c = image_shape
    b = t.shape[0]
    x = t.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class ImageFlow(nnx.Module):
    def __init__(self, config: ImageFlowConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.flow = DeepShallowFlow(config.flow, rngs=rngs)
        if config.num_classes:
            table = 0.02 * jax.random.normal(
                rngs.params(), (config.num_classes + 1, config.flow.context_dim)
            )
            self.class_embed = param(table, ("classes", None))
        else:
            self.class_embed = None

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def context(self, labels: jax.Array | None):
        """(B,) labels (num_classes = the null / unconditional label) -> (B, 1, context_dim)."""
        if self.class_embed is None:
            return None
        return self.class_embed[...][labels][:, None, :]

    def to_tokens(self, levels: jax.Array, key: jax.Array) -> jax.Array:
        cfg = self.config
        if cfg.noise == "uniform":
            x = noise.uniform_dequantize(levels, key, cfg.num_levels)
        else:
            x = noise.gaussian_augment(
                noise.levels_to_unit_range(levels, cfg.num_levels), key, cfg.noise_std
            )
        return patchify(x, cfg.patch_size)

    def log_prob(self, tokens: jax.Array, labels: jax.Array | None) -> jax.Array:
        """Per-example log-density (nats, summed over dims) of continuous tokens."""
        z, logdet = self.flow.forward(tokens, self.context(labels))
        dims = math.prod(z.shape[1:])
        return (
            -0.5 * jnp.sum(jnp.square(z), axis=(1, 2)) - 0.5 * dims * math.log(2 * math.pi) + logdet
        )

    def bits_per_dim(self, levels, labels, key) -> jax.Array:
        """Per-example bits/dim; with uniform dequantisation this is the discrete-data bound."""
        cfg = self.config
        z, logdet = self.flow.forward(self.to_tokens(levels, key), self.context(labels))
        levels_term = cfg.num_levels if cfg.noise == "uniform" else None
        return likelihood.bits_per_dim(z, logdet, num_levels=levels_term)

    def loss(self, batch, key):
        """batch: {"image": int levels (B, H, W, C), "label": (B,)} -> (loss, metrics)."""
        cfg = self.config
        k_noise, k_drop = jax.random.split(key)
        tokens = self.to_tokens(batch["image"], k_noise)
        labels = None
        if cfg.num_classes:
            labels = batch["label"].astype(jnp.int32)
            drop = jax.random.bernoulli(k_drop, cfg.label_dropout, labels.shape)
            labels = jnp.where(drop, self.null_label, labels)
        out = self.flow.forward_all(tokens, self.context(labels))
        nll = likelihood.nll_per_dim(out.z, out.logdet)
        reg = likelihood.latent_norm_penalty(out.block_outputs[:-1])
        levels_term = cfg.num_levels if cfg.noise == "uniform" else None
        bpd = likelihood.bits_per_dim(out.z, out.logdet, num_levels=levels_term)
        dims = math.prod(out.z.shape[1:])
        metrics = {
            "nll": nll.mean(),
            "bits_per_dim": bpd.mean(),
            "logdet": out.logdet.mean() / dims,
            "z_sq": jnp.mean(jnp.square(out.z)),
        }
        return nll.mean() + cfg.latent_norm_reg * reg, metrics

    def sample(
        self,
        key: jax.Array,
        labels: jax.Array,
        *,
        guidance: float = 0.0,
        guidance_rule: str = "product",
        denoise: bool = False,
    ) -> jax.Array:
        """Images in [-1, 1] (B, H, W, C) for `labels` (B,); CFG against the null label when
        guidance > 0 (deep block only). `denoise` applies one Tweedie step for Gaussian-noise
        models."""
        cfg = self.config
        b = labels.shape[0]
        z = jax.random.normal(key, (b, cfg.num_tokens, cfg.flow.token_dim), jnp.float32)
        ctx = self.context(labels)
        uncond = None
        if guidance and ctx is not None:
            uncond = self.context(jnp.full_like(labels, self.null_label))
        tokens = self.flow.inverse(
            z, ctx, guidance=guidance, uncond_context=uncond, guidance_rule=guidance_rule
        )
        if denoise and cfg.noise == "gaussian":
            tokens = noise.tweedie_denoise(
                lambda t: self.log_prob(t, labels), tokens, cfg.noise_std
            )
        return unpatchify(tokens, cfg.patch_size, cfg.image_shape)
