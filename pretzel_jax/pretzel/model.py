"""The Pretzel model: a frozen VLM stream and a trainable deep-flow stream vertically interleaved
under one causal mask and one KV cache (DESIGN.md section 3).

Per position t of a packed row (the layout of `pretzel_jax.data.layout`):

  VLM input     text token -> its embedding; latent slot -> A(u_t)       (A: zero-init adapter;
                with `adapter_window` k, A(the k x k window of u ending at t))
  VLM stream    frozen decoder, M-RoPE ids of the layout               -> y_vlm (final-normed)
  flow input    text -> P_t(y_vlm);  <vision_start> / latent slot -> P_v(u or SOS) + W_vlm(y_vlm)
  deep block    causal over the whole row (same mask, same ids)         -> y_D, (a, mu)
  outputs       (a, mu) at t parametrise the latent at t + 1 (STARFlow's SOS shift);
                logits at t = LM_head(y_vlm + W_D(y_D))

u = f_S(x~): the per-image shallow blocks applied to the noise-augmented, normalised FAE latents
x~ = x + sigma_a * eps (given and generated images alike). W_vlm, W_D and A's last layer start at
zero, so until they are trained the VLM stream is exactly the frozen VLM and the flow stream sees
the text only through P_t. `vlm_taps` adds zero-init projections of more VLM layers to the flow
input. Everything that touches (a, mu, sigma, z, log-det) is fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pretzel_jax.flow.block import AFBlock
from pretzel_jax.kernels import flow_affine
from pretzel_jax.nn import Dense, KVCache, packed_mask
from pretzel_jax.nn.losses import chunked_cross_entropy
from pretzel_jax.nn.sharding import constrain
from pretzel_jax.pretzel.config import PretzelConfig
from pretzel_jax.vlm.lm_loss import patchify
from pretzel_jax.vlm.model import Qwen25VL

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@struct.dataclass
class PretzelCache:
    """One KV cache per stream, written at the same slots (one index: `vlm.index`)."""

    vlm: KVCache  # stacked over the VLM's layers
    deep: KVCache  # stacked over the deep block's layers
    seen_image: jax.Array  # (B,) bool: a latent was fed (w_d_scope="after_image")
    # (B, adapter_history, C): the last slots' u (zeros at other tokens), what the adapter
    # window of the next latents reaches back to.
    recent_u: jax.Array

    @property
    def index(self) -> jax.Array:
        return self.vlm.index[0]

    @property
    def size(self) -> int:
        return self.vlm.size

    @property
    def overflowed(self) -> jax.Array:
        return self.vlm.overflowed | self.deep.overflowed

    def at(self, index) -> PretzelCache:
        """Both streams' write index moved to `index` (a Jacobi window rewritten, a rewind)."""
        return self.replace(vlm=self.vlm.at(index), deep=self.deep.at(index))


class Pretzel(nnx.Module):
    def __init__(self, cfg: PretzelConfig, *, fae: nnx.Module | None, rngs: nnx.Rngs):
        """`fae`: the frozen FAE (`encode(images) -> (B, gh, gw, C)` normalised latents,
        `decode`); None for a model that is only ever given latents (tests, shape checks)."""
        self.cfg = cfg
        fcfg = cfg.flow
        d_vlm, width, c = cfg.vlm.text.hidden_size, fcfg.width, fcfg.token_dim
        kw = dict(
            rngs=rngs,
            param_dtype=jnp.dtype(fcfg.param_dtype),
            compute_dtype=jnp.dtype(fcfg.compute_dtype),
        )
        zeros = dict(kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros)
        self.vlm = Qwen25VL(cfg.vlm, rngs)
        self.fae = fae
        perms = fcfg.block_permutations
        self.shallow = nnx.List(
            [
                AFBlock(fcfg, n, perms[i], conditioned=False, rngs=rngs)
                for i, n in enumerate(fcfg.layers_per_block[:-1])
            ]
        )
        self.deep = AFBlock(fcfg, fcfg.layers_per_block[-1], perms[-1], conditioned=True, rngs=rngs)
        hidden = cfg.adapter_hidden or d_vlm
        self.adapter = nnx.Dict(
            hidden=Dense(c * cfg.adapter_window**2, hidden, axes=("latent", "mlp"), **kw),
            out=Dense(hidden, d_vlm, axes=("mlp", "embed"), **zeros, **kw),
        )
        self.w_vlm = Dense(d_vlm, width, axes=(None, "embed"), **zeros, **kw)
        self.w_d = Dense(width, d_vlm, axes=("embed", None), **zeros, **kw)
        self.taps = nnx.List(
            [
                Dense(d_vlm, width, axes=(None, "embed"), **zeros, **kw)
                for t in cfg.vlm_taps
                if t != -1
            ]
        )

    # -- images -> latents -> u ---------------------------------------------------------------

    def encode(self, images: jax.Array) -> jax.Array:
        """uint8 images (N, H, W, 3) -> normalised FAE latents (N, L, C) fp32 (frozen)."""
        if self.fae is None:
            raise ValueError("this Pretzel model was built without an FAE: pass latents")
        x = self.fae.encode(images)
        return jax.lax.stop_gradient(x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents x (N, L, C) -> float images in [0, 1] through the frozen FAE decoder."""
        gh, gw = self.cfg.latent_grid
        return self.fae.decode(latents.reshape(latents.shape[0], gh, gw, -1))

    def _grid_positions(self, n: int) -> jax.Array | None:
        if self.cfg.flow.rope != "sectioned":
            return None
        gh, gw = self.cfg.latent_grid
        rows, cols = jnp.divmod(jnp.arange(gh * gw), gw)
        grid = jnp.stack([jnp.zeros_like(rows), rows, cols], -1)
        return jnp.broadcast_to(grid, (n, gh * gw, 3))

    def shallow_forward(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x~ (N, L, C) -> (u, log|det du/dx~| (N,)) through the shallow blocks (per image)."""
        positions = self._grid_positions(x.shape[0])
        logdet = jnp.zeros((x.shape[0],), jnp.float32)
        for block in self.shallow:
            x, ld = block.forward(x, positions=positions)
            logdet = logdet + ld
        return x.astype(jnp.float32), logdet

    def shallow_inverse(self, u: jax.Array) -> jax.Array:
        """u (N, L, C) -> x~: the shallow blocks inverted (sequential, unguided)."""
        positions = self._grid_positions(u.shape[0])
        for block in reversed(self.shallow):
            u = block.inverse(u, positions=positions)
        return u.astype(jnp.float32)

    def noisy_latents(self, images: jax.Array, key: jax.Array | None) -> jax.Array:
        """FAE latents of images, noise-augmented at sigma_a (key None: no noise)."""
        x = self.encode(images)
        if key is None or self.cfg.sigma_a == 0:
            return x
        return x + self.cfg.sigma_a * jax.random.normal(key, x.shape, jnp.float32)

    # -- the two streams, shared by training and decoding --------------------------------------

    def adapt(self, u: jax.Array) -> jax.Array:
        """The visual adapter A: u windows (..., k * k * C) (`adapter_windows`) -> VLM input
        embeddings (..., d_vlm)."""
        h = jax.nn.gelu(self.adapter["hidden"](u))
        return self.adapter["out"](h)

    def adapter_windows(
        self, u_seq: jax.Array, positions: jax.Array, recent: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Each latent slot's k x k window of latents ending at it (`adapter_window`), read off
        the sequence: an image's latents are consecutive slots in raster order, so the latent
        dr rows and dc columns back is dr * gw + dc slots back, in this call or in `recent` (the
        slots before it). u_seq (B, T, C), positions (B, T, 3) (latent (r, c) of an image at
        (p, p + r, p + c)), recent (B, adapter_history, C) -> (windows (B, T, k * k * C), the
        new `recent`)."""
        k, gw, w = self.cfg.adapter_window, self.cfg.latent_grid[1], self.cfg.adapter_history
        if k == 1:
            return u_seq, recent
        t = u_seq.shape[1]
        ext = jnp.concatenate([recent.astype(u_seq.dtype), u_seq], axis=1)
        row = (positions[..., 1] - positions[..., 0])[..., None]
        col = (positions[..., 2] - positions[..., 0])[..., None]
        parts = []
        for dr in range(k):
            for dc in range(k):
                back = dr * gw + dc
                inside = (row >= dr) & (col >= dc)
                parts.append(jnp.where(inside, ext[:, w - back : w - back + t], 0.0))
        return jnp.concatenate(parts, axis=-1), ext[:, ext.shape[1] - w :]

    def _vlm_embeds(self, tokens, u_seq, is_latent, positions, recent, native=None):
        """-> (VLM input embeddings, the new `recent_u`)."""
        if self.cfg.stage == 1:
            # Stage 1 freezes A at zero (checked at start), so nothing trainable reaches the VLM
            # stream: cut it from the backward pass (same gradients, 9% faster toy step).
            u_seq = jax.lax.stop_gradient(u_seq)
        x = self.vlm.text.embed_tokens(tokens)
        windows, recent = self.adapter_windows(u_seq, positions, recent)
        vis = self.adapt(windows).astype(x.dtype)
        if native is not None:  # understanding_input="native": the tower's features instead
            feats, use = native
            vis = jnp.where(use[..., None], feats.astype(x.dtype), vis)
        return jnp.where(is_latent[..., None], vis, x), recent

    def _deep_inputs(self, tokens, u_seq, is_latent, y, layers):
        is_vs = tokens == self.cfg.vlm.vision_start_token_id
        sos = jnp.broadcast_to(self.deep.sos[...].astype(jnp.float32), u_seq.shape)
        visual = self.deep.embed_tokens(jnp.where(is_vs[..., None], sos, u_seq)) + self.w_vlm(y)
        text = self.deep.embed_context(y)
        h = jnp.where((is_latent | is_vs)[..., None], visual, text.astype(visual.dtype))
        taps = [t for t in self.cfg.vlm_taps if t != -1]
        for proj, t in zip(self.taps, taps, strict=True):
            h = h + proj(layers[t]).astype(h.dtype)
        return constrain(h, ("batch", "length", "embed"))

    def vlm_positions(self, positions: jax.Array, is_latent: jax.Array) -> jax.Array:
        """The VLM stream's M-RoPE ids: latent slots on the `vlm_grid_stride`-coarser grid."""
        stride = self.cfg.vlm_grid_stride
        if stride == 1:
            return positions
        t = positions[..., :1]
        return jnp.where(is_latent[..., None], t + (positions - t) // stride, positions)

    def _streams(self, tokens, u_seq, positions, *, recent=None, native=None, **vlm_kw):
        """The VLM stream over (B, T) positions (vlm_kw: kv_mask, cache, segment_ids,
        branch_ids; recent: the cache's `recent_u`, None for whole sequences). -> (is_latent,
        (y_vlm, cache[, per-layer outputs when tapped]), the new `recent_u`)."""
        is_latent = tokens == self.cfg.vlm.image_token_id
        if recent is None:
            recent = jnp.zeros((u_seq.shape[0], self.cfg.adapter_history, u_seq.shape[-1]))
        embeds, recent = self._vlm_embeds(tokens, u_seq, is_latent, positions, recent, native)
        taps = any(t != -1 for t in self.cfg.vlm_taps)
        ids = self.vlm_positions(positions, is_latent)
        out = self.vlm.forward(embeds, ids, return_layers=taps, **vlm_kw)
        return is_latent, out, recent

    def text_hidden(
        self, y_vlm: jax.Array, y_d: jax.Array | None, after_image: jax.Array | None = None
    ) -> jax.Array:
        """The LM head's input: y_vlm + W_D(y_D), with w_d_scope="after_image" only where
        `after_image` (B, T) holds."""
        if y_d is None:
            return y_vlm
        skip = self.w_d(y_d).astype(y_vlm.dtype)
        if self.cfg.w_d_scope == "after_image":
            skip = jnp.where(after_image[..., None], skip, 0)
        return y_vlm + skip

    def lm_head(self) -> jax.Array:
        """The frozen LM head as a (d_vlm, vocab) matrix."""
        text = self.vlm.text
        if text.lm_head is not None:
            return text.lm_head.kernel[...]
        return text.embed[...].T

    # -- teacher-forced forward over packed rows -----------------------------------------------

    def forward(self, batch: dict, key: jax.Array | None, *, run_deep: bool = True) -> dict:
        """Packed arrays of the layout -> per-position outputs and per-image likelihood terms.

        -> dict(`streams`' outputs, u_seq (B, S, C), z (B, S, C)
        (latent slot t against (a, mu) of t - 1), deep_nll (B, S) the deep block's NLL terms
        of each latent slot in nats (0.5 z^2 + log sigma summed over channels, 0 elsewhere),
        image_logdet (B, I) total log|det dz/dx~|, image_z2 (B, I), image_index (B, S))."""
        cfg = self.cfg
        tokens, positions = batch["tokens"], batch["positions"]
        seg, branch = batch["segment_ids"], batch["branch_ids"]
        b, s = tokens.shape
        images = batch["images"]
        n_img, big_l = images.shape[1], cfg.latents_per_image
        if "latents" in batch:  # given directly (tests, shape checks): (B, I, L, C), no noise
            x = batch["latents"].reshape(b * n_img, big_l, -1).astype(jnp.float32)
        else:
            x = self.noisy_latents(images.reshape(b * n_img, *images.shape[2:]), key)
        u, shallow_logdet = self.shallow_forward(x)
        is_latent = tokens == cfg.vlm.image_token_id
        k = jnp.cumsum(is_latent, axis=1) - 1
        k = jnp.clip(k, 0, n_img * big_l - 1)
        u_flat = u.reshape(b, n_img * big_l, -1)
        u_seq = jnp.take_along_axis(u_flat, k[..., None], axis=1)
        u_seq = jnp.where(is_latent[..., None], u_seq, 0.0)
        image_index = jnp.where(is_latent, k // big_l, -1)

        native = None
        if cfg.understanding_input == "native":
            native = self._native_features(images, k, image_index, batch["image_target"])
        fused = cfg.flow.affine_impl == "pallas"
        out = self.streams(
            tokens, u_seq, positions, seg, branch, native=native, run_deep=run_deep, head=not fused
        )
        result = dict(out, u_seq=u_seq, image_index=image_index)
        if not run_deep:
            return result
        onehot = (image_index[..., None] == jnp.arange(n_img)).astype(jnp.float32)  # (B, S, I)
        if fused:  # the head, affine step and masked sums in one kernel
            z, log_sigma, z2 = self._fused_affine(out["y_d"], u_seq, is_latent)
        else:
            # (a, mu) at t - 1 parametrise the latent at t.
            a_prev = jnp.pad(out["a"][:, :-1], ((0, 0), (1, 0), (0, 0)))
            mu_prev = jnp.pad(out["mu"][:, :-1], ((0, 0), (1, 0), (0, 0)))
            sigma = self.deep.sigma(a_prev)
            z = jnp.where(is_latent[..., None], (u_seq - mu_prev) / sigma, 0.0)
            log_sigma = jnp.sum(jnp.log(sigma), -1) * is_latent
            z2 = jnp.sum(jnp.square(z), -1)
        deep_logdet = -jnp.einsum("bs,bsi->bi", log_sigma, onehot)
        result.update(
            z=z,
            deep_nll=0.5 * z2 + log_sigma,
            image_logdet=deep_logdet + shallow_logdet.reshape(b, n_img),
            image_z2=jnp.einsum("bs,bsi->bi", z2, onehot),
        )
        return result

    def _fused_affine(self, y_d, u_seq, is_latent):
        """The deep head on y_D at t - 1, the affine step on the latent at t and the per-position
        sums of log sigma and z^2 over the latent slots, as one Pallas kernel."""
        h = jnp.pad(y_d[:, :-1], ((0, 0), (1, 0), (0, 0)))
        dtype = jnp.dtype(self.cfg.flow.compute_dtype)
        z, log_sigma, z2 = flow_affine.affine_forward(
            h,
            self.deep.proj_out.kernel[...].astype(dtype),
            self.deep.proj_out.bias[...],
            u_seq,
            soft_clip=self.cfg.flow.soft_clip,
            use_softplus=self.cfg.flow.use_softplus,
            impl="pallas",
            mask=is_latent,
            per_position=True,
        )
        return jnp.where(is_latent[..., None], z, 0.0), log_sigma, z2

    def streams(
        self,
        tokens: jax.Array,
        u_seq: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        branch_ids: jax.Array,
        *,
        native=None,
        run_deep: bool = True,
        head: bool = True,
    ) -> dict:
        """Both streams, teacher-forced, over packed rows whose latent slots hold u (u_seq
        (B, S, C), zeros elsewhere). -> dict(y_vlm, y_d, a, mu, hidden = the LM head's input);
        y_d / a / mu are None without `run_deep`, a / mu without `head` (the fused kernel
        applies the head itself)."""
        b, s = tokens.shape
        kv_mask = segment_ids > 0
        is_latent, out, _ = self._streams(
            tokens,
            u_seq,
            positions,
            native=native,
            kv_mask=kv_mask,
            segment_ids=segment_ids,
            branch_ids=branch_ids,
        )
        y = out[0]
        if not run_deep:
            return dict(y_vlm=y, y_d=None, a=None, mu=None, hidden=y)
        layers = out[2] if len(out) > 2 else None
        mask = packed_mask(segment_ids, branch_ids, kv_mask)
        h = self._deep_inputs(tokens, u_seq, is_latent, y, layers)
        y_d, _ = self.deep.hidden(h, rope=self.deep.rope(positions, b, s), mask=mask)
        a, mu = self.deep.head(y_d) if head else (None, None)
        hidden = self.text_hidden(y, y_d, _after_image(is_latent, segment_ids))
        return dict(y_vlm=y, y_d=y_d, a=a, mu=mu, hidden=hidden)

    def _native_features(self, images, k, image_index, image_target):
        """understanding_input="native": (tower features per latent slot, use mask) for the
        context (non-target) images; the tower must give L tokens per image."""
        vcfg = self.cfg.vlm.vision
        b, n_img, h, w, _ = images.shape
        m = vcfg.spatial_merge_size
        per_image = (h // (vcfg.patch_size * m)) * (w // (vcfg.patch_size * m))
        if per_image != self.cfg.latents_per_image:
            raise ValueError(
                f"understanding_input='native': the VLM's tower gives {per_image} tokens per "
                f"{h}x{w} image, the layout has {self.cfg.latents_per_image} slots; use the "
                "tower's grid as data.latent_grid or understanding_input='fae'"
            )
        grid = ((1, h // vcfg.patch_size, w // vcfg.patch_size),) * (b * n_img)
        feats = self.vlm.vision(patchify(images.reshape(b * n_img, h, w, -1), vcfg), grid)
        feats = feats.reshape(b, n_img * per_image, -1)
        slot = jnp.clip(image_index, 0, n_img - 1)
        feats = jnp.take_along_axis(feats, k[..., None], 1)  # k: latent slot -> token index
        context = ~jnp.take_along_axis(image_target, slot, axis=1) & (image_index >= 0)
        return feats, context

    def image_nll(self, out: dict) -> jax.Array:
        """Per-image NLL of x~ in nats/dim (B, I) (without 0.5 log 2pi, like the loss)."""
        dims = self.cfg.latents_per_image * self.cfg.flow.token_dim
        return (0.5 * out["image_z2"] - out["image_logdet"]) / dims

    def image_bits_per_dim(self, out: dict) -> jax.Array:
        """Per-image exact NLL of the noise-augmented latents x~ in bits/dim (B, I)."""
        return (self.image_nll(out) + HALF_LOG_2PI) / math.log(2.0)

    def loss(self, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        """L = L_NF + lambda * L_NTP over the stage's losses (`PretzelConfig.losses`).
        L_NF: mean per-dim NLL over the target images (`image_target`); L_NTP: mean next-token
        cross-entropy over `text_loss_mask`."""
        cfg = self.cfg
        use_nf, use_ntp = cfg.losses
        # Stage 2 trains A alone: W_D is still zero, so the deep stream cannot reach the logits.
        out = self.forward(batch, key, run_deep=use_nf or cfg.stage != 2)
        metrics, loss = {}, jnp.zeros((), jnp.float32)
        if use_nf:
            target = (batch["image_target"] & batch["image_mask"]).astype(jnp.float32)
            count = jnp.maximum(target.sum(), 1.0)
            nll = self.image_nll(out)
            l_nf = jnp.sum(nll * target) / count
            bpd = jnp.sum(self.image_bits_per_dim(out) * target) / count
            loss = loss + l_nf
            metrics.update(flow_nll=l_nf, bits_per_dim=bpd, target_images=target.sum())
        if use_ntp:
            mask = batch["text_loss_mask"]
            nll, correct = chunked_cross_entropy(
                out["hidden"],
                self.lm_head(),
                batch["targets"],
                mask,
                chunk=cfg.ce_chunk,
                compute_dtype=jnp.dtype(cfg.vlm.text.compute_dtype),
            )
            count = jnp.maximum(mask.astype(jnp.float32).sum(), 1.0)
            loss = loss + cfg.lm_weight * nll / count
            metrics.update(lm_loss=nll / count, lm_accuracy=correct / count, target_tokens=count)
        return loss, metrics

    # -- cached decoding ------------------------------------------------------------------------

    def init_cache(self, batch: int, size: int, dtype=None) -> PretzelCache:
        tdt = dtype or jnp.dtype(self.cfg.vlm.text.compute_dtype)
        return PretzelCache(
            vlm=self.vlm.init_cache(batch, size, tdt),
            deep=self.deep.init_cache(batch, size, dtype),
            seen_image=jnp.zeros((batch,), bool),
            recent_u=jnp.zeros((batch, self.cfg.adapter_history, self.cfg.flow.token_dim)),
        )

    def unstacked(self) -> tuple[tuple, tuple]:
        """Both streams' per-layer parameters for `step(..., layers=)` (LayerStack.unstacked)."""
        return self.vlm.text.layers.unstacked(), self.deep.layers.unstacked()

    def step(
        self,
        tokens: jax.Array,
        latents: jax.Array,
        positions: jax.Array,
        cache: PretzelCache,
        *,
        kv_mask: jax.Array | None = None,
        layers: tuple | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, PretzelCache]:
        """T positions (prefill or one step) through both streams with the joint cache.

        tokens (B, T) ids (latent slots hold the image token id); latents (B, T, C): u at the
        latent slots (ignored elsewhere); positions (B, T, 3) M-RoPE ids; kv_mask (B, T): valid
        positions (False for left padding); layers: `unstacked()`, taken once before a decode
        loop. -> (LM-head input (B, T, d_vlm), a, mu (B, T, C) fp32, cache); logits =
        `logits(h)`."""
        b, t = tokens.shape
        vlm_layers, deep_layers = layers or (None, None)
        is_latent, out, recent = self._streams(
            tokens,
            latents.astype(jnp.float32),
            positions,
            recent=cache.recent_u,
            kv_mask=kv_mask,
            cache=cache.vlm,
            layers=vlm_layers,
        )
        y, vlm_cache = out[0], out[1]
        taps = out[2] if len(out) > 2 else None
        h = self._deep_inputs(tokens, latents.astype(jnp.float32), is_latent, y, taps)
        y_d, deep_cache = self.deep.hidden(
            h,
            rope=self.deep.rope(positions, b, t),
            kv_mask=kv_mask,
            cache=cache.deep,
            layers=deep_layers,
        )
        a, mu = self.deep.head(y_d)
        seen = cache.seen_image[:, None] | (jnp.cumsum(is_latent, axis=1) > 0)
        hidden = self.text_hidden(y, y_d, seen)
        new = PretzelCache(vlm=vlm_cache, deep=deep_cache, seen_image=seen[:, -1], recent_u=recent)
        return hidden, a, mu, new

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.vlm.logits(hidden)


def _after_image(is_latent: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """(B, S): a latent of the same document lies at or before each position (documents are
    contiguous runs of one segment id)."""
    count = jnp.cumsum(is_latent, axis=1)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    base = jax.lax.cummax(jnp.where(starts, count - is_latent, 0), axis=1)
    return count > base
