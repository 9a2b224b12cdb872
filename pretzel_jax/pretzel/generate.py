"""Decoding with the joint cache: text-to-image and greedy understanding answers.

Both are single jitted programs over a right-aligned (left-padded) batch of prompts:
- `t2i`: prefill the prompt ending in `<vision_start>`, then L latent steps of the deep block,
  each feeding its sampled u back into both streams (no re-encoding), with STARFlow's
  Gaussian-product CFG on a doubled batch [cond; uncond] (uncond = the empty prompt, as in
  training's caption dropout); then the shallow blocks' inverse per image (unguided) and the FAE
  decoder.
- `answer`: prefill a prompt holding images (their u from the FAE path, noise-augmented as in
  training) and decode text greedily until a stop token.
M-RoPE ids follow the layout: an image's latents sit at (p, p + row, p + col) with p one past
its `<vision_start>`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.flow.guidance import gaussian_product
from pretzel_jax.pretzel.model import Pretzel


def right_align(rows: list[np.ndarray], positions: list[np.ndarray], pad_id: int):
    """Token rows (and their (n, 3) M-RoPE ids) -> (tokens, positions, kv_mask) right-aligned."""
    length = max(len(r) for r in rows)
    b = len(rows)
    tokens = np.full((b, length), pad_id, np.int32)
    pos = np.zeros((b, length, 3), np.int32)
    mask = np.zeros((b, length), bool)
    for i, (r, p) in enumerate(zip(rows, positions, strict=True)):
        tokens[i, length - len(r) :] = r
        pos[i, length - len(r) :] = p
        mask[i, length - len(r) :] = True
    return tokens, pos, mask


def text_positions(n: int, start: int = 0) -> np.ndarray:
    return np.repeat((start + np.arange(n))[:, None], 3, axis=1).astype(np.int32)


def _latent_positions(model: Pretzel, p0: jax.Array) -> jax.Array:
    """(B,) first id of each row's image -> (B, L, 3) ids of its latents."""
    gh, gw = model.cfg.latent_grid
    rows, cols = jnp.divmod(jnp.arange(gh * gw), gw)
    grid = jnp.stack([jnp.zeros_like(rows), rows, cols], -1)
    return p0[:, None, None] + grid[None]


def _image_loop(model: Pretzel, a, mu, cache, p0, noise, guidance, guided: bool):
    """L latent steps from the head output (a, mu) (B2, C) of `<vision_start>`: sample u_j,
    feed it to both streams at its M-RoPE ids, read the next (a, mu). -> (u (B, L, C), cache)."""
    b = noise.shape[0]
    ids = _latent_positions(model, p0)
    image_id = model.cfg.vlm.image_token_id
    rows = a.shape[0]

    def step(carry, j):
        a, mu, cache = carry
        sigma = model.deep.sigma(a)
        if guided:
            mu_e, sigma_e = gaussian_product(mu[:b], sigma[:b], mu[b:], sigma[b:], guidance)
        else:
            mu_e, sigma_e = mu, sigma
        u = mu_e + sigma_e * noise[:, j]
        feed = jnp.concatenate([u, u], 0) if guided else u
        tokens = jnp.full((rows, 1), image_id, jnp.int32)
        pos = jax.lax.dynamic_slice_in_dim(ids, j, 1, axis=1)
        _, a2, mu2, cache = model.step(tokens, feed[:, None], pos, cache)
        return (a2[:, 0], mu2[:, 0], cache), u

    (_, _, cache), us = jax.lax.scan(step, (a, mu, cache), jnp.arange(noise.shape[1]))
    return jnp.moveaxis(us, 0, 1), cache


@functools.partial(jax.jit, static_argnums=(0, 7))
def _t2i(graphdef, state, tokens, positions, kv_mask, noise, guidance, guided):
    model = nnx.merge(graphdef, state)
    rows, length = tokens.shape
    cache = model.init_cache(rows, length + noise.shape[1])
    latents = jnp.zeros((rows, length, model.cfg.flow.token_dim), jnp.float32)
    _, a, mu, cache = model.step(tokens, latents, positions, cache, kv_mask=kv_mask)
    p0 = positions[:, -1, 0] + 1  # one past <vision_start>
    u, _ = _image_loop(model, a[:, -1], mu[:, -1], cache, p0, noise, guidance, guided)
    x = model.shallow_inverse(u)
    return u, x


def t2i(
    model: Pretzel,
    prompts: list[list[int]],
    key: jax.Array,
    *,
    guidance: float = 0.0,
    pad_id: int = 0,
    temperature: float = 1.0,
) -> dict[str, np.ndarray]:
    """Prompt token rows (text, without `<vision_start>`) -> dict(u, x (B, L, C) latents,
    images (B, H, W, 3) float in [0, 1] when the model has an FAE). `guidance` > 0 runs CFG
    against the empty prompt. `temperature` scales the noise."""
    vs = model.cfg.vlm.vision_start_token_id
    rows = [np.asarray([*p, vs], np.int32) for p in prompts]
    guided = guidance > 0
    if guided:
        rows = rows + [np.asarray([vs], np.int32)] * len(prompts)
    tokens, positions, mask = right_align(rows, [text_positions(len(r)) for r in rows], pad_id)
    shape = (len(prompts), model.cfg.latents_per_image, model.cfg.flow.token_dim)
    noise = temperature * jax.random.normal(key, shape, jnp.float32)
    graphdef, state = nnx.split(model)
    u, x = _t2i(graphdef, state, tokens, positions, mask, noise, jnp.float32(guidance), guided)
    out = {"u": np.asarray(u), "x": np.asarray(x)}
    if model.fae is not None:
        out["images"] = np.asarray(_decode(graphdef, state, x))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, x):
    return nnx.merge(graphdef, state).decode(x)


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _answer(graphdef, state, tokens, positions, kv_mask, u_seq, stop, max_new, pad_id):
    model = nnx.merge(graphdef, state)
    rows, length = tokens.shape
    cache = model.init_cache(rows, length + max_new)
    h, _, _, cache = model.step(tokens, u_seq, positions, cache, kv_mask=kv_mask)
    first = jnp.argmax(model.logits(h[:, -1:])[:, 0], -1).astype(jnp.int32)
    next_pos = positions[:, -1, 0] + 1
    zeros = jnp.zeros((rows, 1, u_seq.shape[-1]), jnp.float32)

    def step(carry, i):
        tok, done, cache = carry
        pos = jnp.repeat((next_pos + i)[:, None, None], 3, axis=2)
        h, _, _, cache = model.step(tok[:, None], zeros, pos, cache)
        nxt = jnp.argmax(model.logits(h)[:, 0], -1).astype(jnp.int32)
        done = done | jnp.isin(tok, stop)
        return (nxt, done, cache), jnp.where(done, pad_id, tok)

    init = (first, jnp.zeros((rows,), bool), cache)
    _, out = jax.lax.scan(step, init, jnp.arange(max_new))
    return jnp.moveaxis(out, 0, 1)


def answer(
    model: Pretzel,
    prompts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    key: jax.Array,
    *,
    stop_tokens: list[int],
    max_new_tokens: int,
    pad_id: int,
) -> list[list[int]]:
    """Greedy answers. prompts: (tokens (n,), positions (n, 3), images (k, H, W, 3) uint8) per
    row, the images in the order of the row's image slots. -> generated ids per row (stop token
    and what follows removed)."""
    big_l = model.cfg.latents_per_image
    tokens, positions, mask = right_align([p[0] for p in prompts], [p[1] for p in prompts], pad_id)
    images = [img for p in prompts for img in p[2]]
    u_seq = np.zeros((*tokens.shape, model.cfg.flow.token_dim), np.float32)
    graphdef, state = nnx.split(model)
    if images:
        u = np.asarray(_context_u(graphdef, state, np.stack(images), key))
        k = 0
        for i, p in enumerate(prompts):
            slots = np.flatnonzero(tokens[i] == model.cfg.vlm.image_token_id)
            n = len(p[2])
            if len(slots) != n * big_l:
                raise ValueError(
                    f"prompt {i} has {len(slots)} latent slots for {n} images of {big_l} latents"
                )
            u_seq[i, slots] = u[k : k + n].reshape(n * big_l, -1)
            k += n
    out = np.asarray(
        _answer(
            graphdef,
            state,
            tokens,
            positions,
            mask,
            u_seq,
            jnp.asarray(stop_tokens, jnp.int32),
            max_new_tokens,
            pad_id,
        )
    )
    result = []
    for row in out:
        ids = []
        for t in row:
            if int(t) in stop_tokens or int(t) == pad_id:
                break
            ids.append(int(t))
        result.append(ids)
    return result


@functools.partial(jax.jit, static_argnums=0)
def _context_u(graphdef, state, images, key):
    """Context images -> u through the FAE path, noise-augmented as in training."""
    model = nnx.merge(graphdef, state)
    u, _ = model.shallow_forward(model.noisy_latents(images, key))
    return u
