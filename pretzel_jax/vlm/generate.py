"""Batched generation with the explicit fixed-size KV cache: prefill, then a decode loop in one jit.

- Prompts are left-padded (right-padded input is re-packed to the left), then padded further on
  the left to a multiple of `bucket`; the cache holds `bucket`-rounded prompt + max_new_tokens
  slots. Compiles are keyed by (batch, bucketed length, cache size, max_new_tokens, and whether
  decoding is greedy / sampled / sampled with top-k or top-p): other prompt lengths in the bucket,
  temperatures, top-k and top-p values, stop tokens (up to 8) and seeds reuse the program.
- The vision tower runs once, inside the (separately jitted) embedding step; the decode loop only
  embeds the sampled token.
- M-RoPE positions come from `rope_index` (host side); the k-th generated token gets the last
  prompt position + 1 + k on each axis (HF generate's rule; see rope_index.py).
- Sampling: temperature 0 is greedy (argmax); else logits / temperature, then top-k, then top-p
  (the order of HF's logits warpers), then a categorical draw with `fold_in(key, step)`.
- Stop tokens: per-example done flags; a finished example emits `pad_token_id` afterwards (the stop
  token itself is kept, as HF does); the loop exits when every example is done.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.vlm.rope_index import rope_index


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    tokens: np.ndarray  # (B, max_new_tokens) int32; after a stop token: pad_token_id
    lengths: np.ndarray  # (B,) tokens generated, the stop token included


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def left_pad(input_ids, attention_mask, pad_token_id: int, length: int):
    """Re-pack every row's real tokens to the right end of a (B, length) array -> (ids, mask)."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    out = np.full((ids.shape[0], length), pad_token_id, ids.dtype)
    out_mask = np.zeros((ids.shape[0], length), bool)
    for b in range(ids.shape[0]):
        real = ids[b][mask[b]]
        if real.size == 0:
            raise ValueError(f"prompt {b} has no tokens (attention_mask is all zero)")
        out[b, length - real.size :] = real
        out_mask[b, length - real.size :] = True
    return out, out_mask


def _stop_array(stop_tokens) -> np.ndarray:
    """Stop ids padded with -1 (never sampled) to a multiple of 8: fewer shapes to compile."""
    stops = np.asarray(stop_tokens, np.int32).reshape(-1)
    return np.pad(stops, (0, _round_up(max(stops.size, 1), 8) - stops.size), constant_values=-1)


def filter_logits(logits: jax.Array, top_k=0, top_p=1.0) -> jax.Array:
    """(B, V) logits with tokens outside the top-k, then outside the top-p nucleus (of the
    top-k-renormalised distribution), set to the dtype's minimum; HF's warper semantics, ties at
    the cut kept. top_k = 0 and top_p >= 1 switch a filter off; at least one token survives.
    top_k and top_p may be traced: one sort serves both, so their values never recompile."""
    neg = jnp.finfo(logits.dtype).min
    vocab = logits.shape[-1]
    srt = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_k = jnp.arange(vocab) < k
    probs = jax.nn.softmax(jnp.where(in_k, srt, -jnp.inf), axis=-1)
    # Keep a token if the tokens more probable than it hold < top_p of the mass.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((before < top_p) | (top_p >= 1.0))
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, neg, logits)


def sample_token(logits, key, *, greedy: bool, filtered: bool, temperature, top_k, top_p):
    """(B, V) float32 logits -> (B,) int32 token ids. `greedy` and `filtered` are static."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if filtered:
        logits = filter_logits(logits, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _embed(graphdef, state, input_ids, pixel_values, image_grid_thw):
    model = nnx.merge(graphdef, state)
    if pixel_values is None:
        return model.embed(input_ids)
    return model.embed(input_ids, pixel_values, image_grid_thw)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "cache_size", "max_new_tokens", "greedy", "filtered")
)
def _prefill_and_decode(
    state,
    embeds,
    kv_mask,
    positions,
    stop_tokens,
    pad_token_id,
    key,
    temperature,
    top_k,
    top_p,
    *,
    graphdef,
    cache_size: int,
    max_new_tokens: int,
    greedy: bool,
    filtered: bool,
):
    model = nnx.merge(graphdef, state)
    batch = embeds.shape[0]
    sample = functools.partial(
        sample_token,
        greedy=greedy,
        filtered=filtered,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    cache = model.init_cache(batch, cache_size, dtype=embeds.dtype)
    layers = model.text.layers.unstacked()  # once, for prefill and every step (LayerStack)
    hidden, cache = model.forward(embeds, positions, kv_mask=kv_mask, cache=cache, layers=layers)
    logits = model.logits(hidden[:, -1:])[:, 0]
    tok = sample(logits, jax.random.fold_in(key, 0))
    done = jnp.isin(tok, stop_tokens)
    out = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(tok)
    next_pos = positions[:, -1, :] + 1  # (B, 3): rows are left-padded, the last slot is real

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tok, cache, done, out = carry
        pos = (next_pos + step - 1)[:, None, :]
        h, cache = model.forward(
            model.embed(tok[:, None]),
            pos,
            kv_mask=jnp.ones((batch, 1), bool),
            cache=cache,
            layers=layers,
        )
        new = sample(model.logits(h)[:, 0], jax.random.fold_in(key, step))
        new = jnp.where(done, pad_token_id, new)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
        return step + 1, new, cache, done | jnp.isin(new, stop_tokens), out

    carry = (jnp.ones((), jnp.int32), tok, cache, done, out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    pixel_values=None,
    image_grid_thw=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens=(),
    pad_token_id: int = 0,
    seed: int | jax.Array = 0,
    bucket: int = 64,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens for each prompt row.

    model: a `Qwen25VL` (vlm/model.py). input_ids (B, L) with attention_mask (B, L) (1 = real;
    left or right padding); pixel_values (N_patches, C*T*P*P) and image_grid_thw (n_images, 3)
    for the `<|image_pad|>` tokens of all rows, in order. temperature 0 = greedy.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got temperature={temperature}, "
            f"top_k={top_k}, top_p={top_p}"
        )
    cfg = model.cfg
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    length = _round_up(ids.shape[1], bucket)
    ids, mask = left_pad(ids, attention_mask, pad_token_id, length)
    merge = cfg.vision.spatial_merge_size if cfg.vision is not None else 1
    positions, _ = rope_index(
        ids,
        image_grid_thw,
        mask,
        spatial_merge_size=merge,
        image_token_id=cfg.image_token_id,
        vision_start_token_id=cfg.vision_start_token_id if image_grid_thw is not None else None,
    )
    graphdef, state = nnx.split(model)
    grid = None
    if pixel_values is not None:
        grid = tuple(
            tuple(int(v) for v in row) for row in np.asarray(image_grid_thw).reshape(-1, 3)
        )
        pixel_values = jnp.asarray(pixel_values, jnp.float32)
    embeds = _embed(graphdef, state, jnp.asarray(ids, jnp.int32), pixel_values, grid)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    tokens = _prefill_and_decode(
        state,
        embeds,
        jnp.asarray(mask),
        jnp.asarray(positions),
        jnp.asarray(_stop_array(stop_tokens)),
        jnp.int32(pad_token_id),
        key,
        jnp.float32(max(temperature, 1e-6)),
        jnp.int32(top_k),
        jnp.float32(top_p),
        graphdef=graphdef,
        cache_size=_round_up(length + max_new_tokens, bucket),
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0.0,
        filtered=top_k > 0 or top_p < 1.0,
    )
    tokens = np.asarray(tokens)
    stops = np.isin(tokens, np.asarray(stop_tokens, np.int64).reshape(-1))
    first = np.where(stops.any(1), stops.argmax(1) + 1, max_new_tokens)
    return GenerateOutput(tokens=tokens, lengths=first.astype(np.int32))
