"""The feature autoencoder (FAE, "One Layer Is Enough"): a frozen representation encoder's patch
features -> one self-attention layer + linear -> a compact Gaussian latent (KL) -> a non-causal
Transformer feature decoder back to the encoder's feature space -> a ViT pixel decoder.

Two training phases (`FAEConfig.phase`):
  "feature"      feature reconstruction (L2) + KL trains the latent encoder and feature decoder
                 (optionally on latents noised like the flow's, `latent_noise`);
                 the pixel decoder learns from noise-augmented TRUE features meanwhile.
  "pixel_adapt"  only the pixel decoder trains, on features decoded from normalised latents
                 noised at the flow's `sigma_a`, so it decodes what the flow samples.
Pixel losses: L1 + L2, a perceptual L2 in the frozen encoder's feature space, and an optional
small patch-GAN (hinge; `gan_weight` > 0).

Public API: `encode(images) -> (B, h, w, C)` normalised latents (images uint8 or float in
[0, 1], (B, H, W, 3)); `decode(latents) -> (B, R, R, 3)` float32 images in [0, 1]
(`to_uint8` converts). The per-channel latent statistics are frozen params (`latent_norm`),
set from training data after phase "feature" and saved with the FAE's weights.

The frozen encoder is any module with `encode(pixels (B, H, W, 3) normalised) -> (B, h, w, D)`
(`fae.encoders.DinoV2`, `fae.encoders.QwenVisionEncoder`); its params are held in the model under
`encoder/` and kept frozen by the train loop's `optim.freeze` (see `frozen_patterns`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pretzel_jax.nn import Dense, LayerNorm
from pretzel_jax.nn.sharding import param
from pretzel_jax.nn.transformer import LayerStack, TransformerConfig, TransformerLayer

PHASES = ("feature", "pixel_adapt")
# Parameter-path regexes that must be frozen in each phase (checked by the registry against
# `optim.freeze`, so that a config can never train the representation encoder by mistake).
FROZEN = {
    "feature": (r"^encoder/", r"^latent_norm/"),
    "pixel_adapt": (r"^encoder/", r"^latent_norm/", r"^latent_encoder/", r"^feature_decoder/"),
}


@dataclasses.dataclass(frozen=True)
class FAEConfig:
    image_size: int  # encoder input side (pixels)
    feature_grid: int  # side of the (grouped) feature grid: latents are feature_grid^2 x C
    feature_dim: int  # width D of the (grouped) features: encoder width * feature_group^2
    # s > 1 concatenates each s x s block of encoder patch features into one token (as Qwen's
    # merger groups 2x2), so a fine-patch encoder gives a coarser latent grid.
    feature_group: int = 1
    latent_channels: int = 32
    encoder_heads: int = 8  # of the one attention layer at width D
    decoder_depth: int = 6  # feature decoder layers
    decoder_width: int = 0  # 0 = feature_dim
    decoder_heads: int = 8
    pixel_depth: int = 6
    pixel_width: int = 512
    pixel_heads: int = 8
    output_size: int = 0  # decoded image side; 0 = image_size
    mlp_ratio: int = 4
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # encoder input normalisation
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    phase: str = "feature"
    sigma_a: float = 0.3  # the flow's noise std on normalised latents (phase "pixel_adapt")
    feature_noise: float = 0.1  # std of phase-"feature" pixel-decoder input noise, x feature RMS
    # Phase "feature": noise of this std (x each latent channel's batch std, i.e. roughly in
    # normalised units) on the sampled latent before the feature decoder, so that it learns to
    # decode latents as noisy as the flow's (set it to sigma_a). 0 = off.
    latent_noise: float = 0.0
    # Standardise each encoder patch feature (a LayerNorm without parameters): a tower's raw
    # hidden states (Qwen's, before its merger) can have RMS in the tens, which lets the
    # feature loss drown the pixel losses under one global gradient clip.
    feature_norm: bool = True
    kl_weight: float = 1e-4
    feature_weight: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    perceptual_weight: float = 0.1
    gan_weight: float = 0.0  # > 0 adds a small patch discriminator (hinge loss)
    gan_width: int = 32
    remat: str = "none"
    unroll_layers: bool = False  # the decoders' layer stacks unrolled (TransformerConfig)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r} is unknown; use one of {PHASES}")
        if self.feature_grid < 1 or self.output_size_ % self.feature_grid:
            raise ValueError(
                f"output_size ({self.output_size_}) must be a multiple of feature_grid "
                f"({self.feature_grid}): the pixel decoder emits one square patch per feature"
            )
        for name, width, heads in (
            ("encoder", self.feature_dim, self.encoder_heads),
            ("decoder", self.decoder_width_, self.decoder_heads),
            ("pixel", self.pixel_width, self.pixel_heads),
        ):
            if width % heads:
                raise ValueError(f"{name} width {width} is not a multiple of {name}_heads {heads}")
        if self.sigma_a < 0 or self.feature_noise < 0:
            raise ValueError("sigma_a and feature_noise must be >= 0")

    @property
    def decoder_width_(self) -> int:
        return self.decoder_width or self.feature_dim

    @property
    def output_size_(self) -> int:
        return self.output_size or self.image_size

    @property
    def output_patch(self) -> int:
        return self.output_size_ // self.feature_grid

    def transformer(self, width: int, heads: int) -> TransformerConfig:
        return TransformerConfig(
            dim=width,
            heads=heads,
            head_dim=width // heads,
            mlp_hidden=self.mlp_ratio * width,
            remat=self.remat,
            unroll_layers=self.unroll_layers,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
        )


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged over all elements."""
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def _full_mask(x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    return jnp.ones((b, t, t), bool)  # non-causal: every token sees every token


def _positions(rngs: nnx.Rngs, tokens: int, width: int, dtype) -> nnx.Param:
    init = nnx.initializers.normal(0.02)
    return param(init(rngs.params(), (tokens, width), dtype), ("length", "embed"))


class LatentEncoder(nnx.Module):
    """One pre-norm self-attention layer (with its MLP) over the patch features, then a linear
    map to the latent's mean and log-variance."""

    def __init__(self, cfg: FAEConfig, *, rngs: nnx.Rngs):
        d, pdt = cfg.feature_dim, jnp.dtype(cfg.param_dtype)
        self.layer = TransformerLayer(cfg.transformer(d, cfg.encoder_heads), rngs=rngs)
        self.norm = LayerNorm(d)
        self.out = Dense(
            d, 2 * cfg.latent_channels, axes=("embed", "latent"), rngs=rngs, param_dtype=pdt
        )

    def __call__(self, feats: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, T, D) -> mean, logvar (B, T, C), fp32."""
        x, _ = self.layer(feats, mask=_full_mask(feats))
        mean, logvar = jnp.split(self.out(self.norm(x)).astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


class TokenTransformer(nnx.Module):
    """Linear in -> + learned positions -> non-causal LayerStack -> norm -> linear out."""

    def __init__(self, cfg: FAEConfig, d_in, d_out, width, heads, depth, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        kw = dict(rngs=rngs, param_dtype=pdt)
        self.proj_in = Dense(d_in, width, axes=(None, "embed"), **kw)
        self.pos = _positions(rngs, cfg.feature_grid**2, width, pdt)
        self.layers = LayerStack(cfg.transformer(width, heads), depth, rngs=rngs)
        self.norm = LayerNorm(width)
        self.proj_out = Dense(width, d_out, axes=("embed", None), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.proj_in(x) + self.pos[...].astype(x.dtype)
        h, _ = self.layers(h, mask=_full_mask(h))
        return self.proj_out(self.norm(h)).astype(jnp.float32)


class PatchDiscriminator(nnx.Module):
    """A small patch-GAN: strided 4x4 convs -> one logit per patch."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        conv = lambda i, o, s: nnx.Conv(i, o, (4, 4), strides=s, padding="SAME", rngs=rngs)
        self.convs = nnx.List([conv(3, width, 2), conv(width, 2 * width, 2)])
        self.out = conv(2 * width, 1, 1)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images * 2.0 - 1.0
        for c in self.convs:
            x = jax.nn.leaky_relu(c(x), 0.2)
        return self.out(x)


class FAE(nnx.Module):
    def __init__(self, cfg: FAEConfig, encoder: nnx.Module, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = encoder
        self.latent_encoder = LatentEncoder(cfg, rngs=rngs)
        c, d = cfg.latent_channels, cfg.feature_dim
        self.feature_decoder = TokenTransformer(
            cfg, c, d, cfg.decoder_width_, cfg.decoder_heads, cfg.decoder_depth, rngs=rngs
        )
        self.pixel_decoder = TokenTransformer(
            cfg,
            d,
            3 * cfg.output_patch**2,
            cfg.pixel_width,
            cfg.pixel_heads,
            cfg.pixel_depth,
            rngs=rngs,
        )
        self.latent_norm = nnx.Dict(
            mean=param(jnp.zeros((c,), jnp.float32), ("latent",)),
            std=param(jnp.ones((c,), jnp.float32), ("latent",)),
        )
        self.discriminator = (
            PatchDiscriminator(cfg.gan_width, rngs=rngs) if cfg.gan_weight else None
        )

    # -- the pieces --------------------------------------------------------------------------

    def features(self, images: jax.Array) -> jax.Array:
        """Float images in [0, 1] (B, H, W, 3) -> frozen encoder features (B, T, D)."""
        cfg = self.cfg
        b, hh, ww, _ = images.shape
        if (hh, ww) != (cfg.image_size, cfg.image_size):
            images = jax.image.resize(images, (b, cfg.image_size, cfg.image_size, 3), "bilinear")
        mean, std = jnp.asarray(cfg.pixel_mean), jnp.asarray(cfg.pixel_std)
        feats = self.encoder.encode((images - mean) / std)
        g, s = cfg.feature_grid, cfg.feature_group
        want = (b, g * s, g * s, cfg.feature_dim // s**2)
        if feats.shape != want:
            raise ValueError(
                f"the encoder gave features {feats.shape} for {cfg.image_size}px images, but the "
                f"FAE config expects {want}; fix model.fae image_size/feature_group"
            )
        if cfg.feature_norm:
            centred = feats - jnp.mean(feats, -1, keepdims=True, dtype=jnp.float32)
            feats = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + 1e-6)
        feats = feats.reshape(b, g, s, g, s, -1).transpose(0, 1, 3, 2, 4, 5)
        return feats.reshape(b, g * g, cfg.feature_dim).astype(jnp.float32)

    def to_pixels(self, feats: jax.Array) -> jax.Array:
        """Features (B, T, D) -> images (B, R, R, 3), unclipped, ~[0, 1]."""
        cfg = self.cfg
        b, g, p = feats.shape[0], cfg.feature_grid, cfg.output_patch
        patches = self.pixel_decoder(feats).reshape(b, g, g, p, p, 3)
        return patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, 3) + 0.5

    def normalize(self, latents: jax.Array) -> jax.Array:
        return (latents - self.latent_norm["mean"][...]) / self.latent_norm["std"][...]

    def denormalize(self, latents: jax.Array) -> jax.Array:
        return latents * self.latent_norm["std"][...] + self.latent_norm["mean"][...]

    # -- public API --------------------------------------------------------------------------

    def encode(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, 3), uint8 or float in [0, 1] -> normalised latents (B, h, w, C)
        (the posterior mean)."""
        mean, _ = self.latent_encoder(self.features(as_float(images)))
        g = self.cfg.feature_grid
        return self.normalize(mean).reshape(mean.shape[0], g, g, -1)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Normalised latents (B, h, w, C) -> float32 images (B, R, R, 3) in [0, 1]."""
        b = latents.shape[0]
        z = self.denormalize(latents.reshape(b, -1, latents.shape[-1]).astype(jnp.float32))
        return jnp.clip(self.to_pixels(self.feature_decoder(z)), 0.0, 1.0)

    # -- training ----------------------------------------------------------------------------

    def loss(self, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        cfg = self.cfg
        images = as_float(batch["image"])
        k_latent, k_noise = jax.random.split(key)
        feats = jax.lax.stop_gradient(self.features(images))
        metrics = {}
        if cfg.phase == "feature":
            mean, logvar = self.latent_encoder(feats)
            k_latent, k_aug = jax.random.split(k_latent)
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_latent, mean.shape)
            if cfg.latent_noise:
                scale = jax.lax.stop_gradient(jnp.std(mean, axis=(0, 1)))
                z = z + cfg.latent_noise * scale * jax.random.normal(k_aug, mean.shape)
            feat_loss = jnp.mean(jnp.square(self.feature_decoder(z) - feats))
            kl = kl_divergence(mean, logvar)
            rms = jnp.sqrt(jnp.mean(jnp.square(feats)))
            pix_in = feats + cfg.feature_noise * rms * jax.random.normal(k_noise, feats.shape)
            loss = cfg.feature_weight * feat_loss + cfg.kl_weight * kl
            metrics |= {"feature_l2": feat_loss, "kl": kl}
        else:
            mean, _ = self.latent_encoder(feats)
            noisy = self.normalize(mean) + cfg.sigma_a * jax.random.normal(k_noise, mean.shape)
            pix_in = jax.lax.stop_gradient(self.feature_decoder(self.denormalize(noisy)))
            loss = 0.0
        recon = self.to_pixels(pix_in)
        target = _resize(images, cfg.output_size_)
        l1 = jnp.mean(jnp.abs(recon - target))
        l2 = jnp.mean(jnp.square(recon - target))
        loss = loss + cfg.l1_weight * l1 + cfg.l2_weight * l2
        metrics |= {"pixel_l1": l1, "pixel_l2": l2}
        if cfg.perceptual_weight:  # a second encoder pass (and its backward): skip when off
            perceptual = jnp.mean(jnp.square(self.features(recon) - feats))
            loss = loss + cfg.perceptual_weight * perceptual
            metrics["perceptual"] = perceptual
        if self.discriminator is not None:
            # One loss for both players: the decoder sees the discriminator's output through
            # stop-gradiented weights, the discriminator sees stop-gradiented fakes.
            disc = self.discriminator
            d_real = disc(target)
            d_fake = disc(jax.lax.stop_gradient(recon))
            d_loss = jnp.mean(jax.nn.relu(1 - d_real)) + jnp.mean(jax.nn.relu(1 + d_fake))
            g_state = jax.lax.stop_gradient(nnx.state(disc))
            g_disc = nnx.merge(nnx.graphdef(disc), g_state)
            g_loss = -jnp.mean(g_disc(recon))
            loss = loss + cfg.gan_weight * g_loss + d_loss
            metrics |= {"gan_g": g_loss, "gan_d": d_loss}
        return loss, metrics


def as_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1]."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def to_uint8(images: jax.Array) -> jax.Array:
    return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def _resize(images: jax.Array, size: int) -> jax.Array:
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (b, size, size, c), "bilinear")
