"""The interleaved sampler: one jitted `lax.while_loop` over the joint cache, one position per row
per iteration, each row in its own mode (DESIGN.md section 4, "interleaved"):

  text   the LM head's next token (greedy, or temperature / top-k / top-p); `<vision_start>`
         switches the row to image mode, a stop token ends it
  image  L latent steps of the deep block: u_j = mu + sigma * eps from the (a, mu) of the previous
         position (STARFlow's Gaussian-product CFG against an unconditional row), fed back into
         both streams at the image's M-RoPE ids (no re-encoding); then `<vision_end>` and text
  done   writes nothing visible (kv_mask False)

Block-Jacobi (`jacobi_chunk` K > 0): while every unfinished row is inside an image at the same
latent offset (text-to-image; interleaving on an `image_every` schedule), the next K latents of
all of them are one fixed window of cache slots, rewritten by each call until they settle (at
most K calls; `jacobi_tol` 0 = the sequential latents up to float rounding). Otherwise latents
go one at a time, so a row's samples do not depend on the batch beyond that rounding.

With guidance the batch is doubled: unconditional row i mirrors row i's images only. When row i
opens an image, row B + i's cache is cleared and it sees `<vision_start>` and that image's latents
at the ids of a caption-less document (training's caption dropout); between images it idles. In
text-to-image, a negative prompt may take the caption-less document's place (`sample(negative=)`).

Randomness is per row key and generated position (`position_key`, `context_key`), so a row
samples the same in any batch. A row stops at a stop token, after `max_new` generated positions,
or when an image would not fit the cache or the budget (it never starts an image it cannot
finish; `STOP_REASONS`). After the loop the shallow blocks invert every image and the FAE
decodes it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.fae.model import to_uint8
from pretzel_jax.flow.guidance import gaussian_product
from pretzel_jax.flow.jacobi import relative_change
from pretzel_jax.pretzel.model import Pretzel

TEXT, IMAGE, DONE = 0, 1, 2
STOP_REASONS = ("running", "stop_token", "max_new", "no_room")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """max_new: positions each row may generate (text tokens, `<vision_start>`, latents,
    `<vision_end>`). max_images: images per row (further `<vision_start>`s are banned).
    temperature 0 = greedy text; top_k 0 / top_p 1 = off. image_temperature scales the latent
    noise. guidance: CFG scale (0 = no unconditional rows)."""

    max_new: int
    max_images: int = 1
    stop_tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    image_temperature: float = 1.0
    guidance: float = 0.0
    image_every: int = 0  # > 0: images open after exactly this many text tokens, never sooner
    # > 0: block-Jacobi over chunks of this many latents (must divide L) while every unfinished
    # row is inside an image at the same latent offset; otherwise latents go one at a time.
    jacobi_chunk: int = 0
    # A chunk stops when the squared relative change of its latents (worst row) is <= this:
    # 0 = the sequential result (up to float rounding), in at most `jacobi_chunk` calls.
    jacobi_tol: float = 0.0
    # The BAGEL-style baseline, for benchmarks: at each `<vision_end>` the image is decoded to
    # pixels, re-encoded (FAE encoder, noise, shallow blocks) and the whole sequence is
    # re-prefilled into a fresh cache.
    reencode: bool = False


def pick_token(logits, key, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """One token id from (V,) fp32 logits."""
    if temperature == 0:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        order = jnp.argsort(-logits)
        probs = jax.nn.softmax(logits[order])
        keep = jnp.cumsum(probs) - probs < top_p  # the smallest prefix holding top_p
        logits = logits.at[order].set(jnp.where(keep, logits[order], -jnp.inf))
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _reencode(model: Pretzel, layers, closing, keys, index, hist, image, h, a, mu, cache):
    """The baseline's work at `<vision_end>`: the closing rows' image (u (B, L, C), first
    slot (B,)) -> pixels -> FAE encoder -> noise -> shallow blocks -> u', written over its
    slots; then every row's whole history re-prefilled into a fresh cache. -> the outputs at
    slot `index` (just written) and the cache with its write index after it."""
    image_u, start = image
    b, big_l = image_u.shape[:2]
    pixels = to_uint8(model.decode(model.shallow_inverse(image_u)))
    x = model.noisy_latents(pixels, None)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x.shape[1:]))(keys)
    u2, _ = model.shallow_forward(x + model.cfg.sigma_a * noise)
    rows = hist["u"].shape[0]
    at = (start[:, None] + jnp.arange(big_l))[jnp.arange(rows) % b]
    old = jnp.take_along_axis(hist["u"], at[..., None], axis=1)
    new = jnp.where(
        jnp.tile(closing, rows // b)[:, None, None], jnp.tile(u2, (rows // b, 1, 1)), old
    )
    hist = dict(hist, u=jax.vmap(lambda h_, i, v: h_.at[i].set(v))(hist["u"], at, new))
    fresh = model.init_cache(rows, hist["tok"].shape[1])
    h2, a2, mu2, fresh = model.step(
        hist["tok"], hist["u"], hist["pos"], fresh, kv_mask=hist["mask"], layers=layers
    )
    fresh = fresh.at(index + 1)
    pick = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=index, slice_size=1, axis=1)
    return hist, pick(h2), pick(a2), pick(mu2), fresh


def position_key(row_key: jax.Array, n) -> jax.Array:
    """The key of a row's n-th generated position: its token is drawn with it, or its latent
    noise as `normal(position_key, (C,))`."""
    return jax.random.fold_in(jax.random.split(row_key)[1], n)


def context_key(row_key: jax.Array, k) -> jax.Array:
    """The key of the noise augmentation of a row's k-th prompt image."""
    return jax.random.fold_in(jax.random.split(row_key)[0], k)


def row_keys(key: jax.Array, rows: int) -> jax.Array:
    """One key per row: a (rows,) batch of keys as given, or a single key split."""
    if key.shape == ():
        return jax.random.split(key, rows)
    if key.shape != (rows,):
        raise ValueError(f"give one key or {rows} keys (one per prompt), got shape {key.shape}")
    return key


def _clear_rows(cache, rows: jax.Array):
    """Hide every cached key of the rows where `rows` (R,) holds (caches stacked over layers)."""

    def clear(kv):
        return kv.replace(kv_mask=jnp.where(rows[None, :, None], False, kv.kv_mask))

    return cache.replace(vlm=clear(cache.vlm), deep=clear(cache.deep))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample(
    graphdef, cfg: SampleConfig, size: int, state, tokens, positions, kv_mask, u_seq, key, neg=None
):
    model: Pretzel = nnx.merge(graphdef, state)
    mc = model.cfg
    vs_id, ve_id, img_id = (
        mc.vlm.vision_start_token_id,
        mc.vlm.vision_end_token_id,
        mc.vlm.image_token_id,
    )
    b = tokens.shape[0]
    guided = cfg.guidance > 0
    big_l, c = mc.latents_per_image, mc.flow.token_dim
    gh, gw = mc.latent_grid
    resume = max(gh, gw) // mc.vlm_grid_stride  # text after an image: the layout's rule
    grid = jnp.stack([jnp.zeros(big_l, jnp.int32), *jnp.divmod(jnp.arange(big_l), gw)], -1)
    opens = tokens[:, -1] == vs_id  # prompts ending in <vision_start> open in image mode
    slots = max(cfg.max_images, 1)

    # The unconditional row's first latent id: after its own <vision_start>.
    p0_u = jnp.ones((b,), jnp.int32)
    if guided and neg is None:  # unconditional rows: only an opening <vision_start>, at id 0
        tokens = jnp.concatenate([tokens, tokens])
        u_seq = jnp.concatenate([u_seq, u_seq])
        kv_mask = jnp.concatenate([kv_mask, kv_mask.at[:, :-1].set(False) & opens[:, None]])
        positions = jnp.concatenate([positions, jnp.zeros_like(positions)])
    elif guided:  # negative prompts (text ending in <vision_start>) as the unconditional rows
        neg_tokens, neg_positions, neg_mask = neg
        tokens = jnp.concatenate([tokens, neg_tokens])
        u_seq = jnp.concatenate([u_seq, jnp.zeros_like(u_seq)])
        kv_mask = jnp.concatenate([kv_mask, neg_mask])
        positions = jnp.concatenate([positions, neg_positions])
        p0_u = neg_positions[:, -1, 0] + 1
    rows = tokens.shape[0]
    cache = model.init_cache(rows, size)
    layers = model.unstacked()  # once, for the prefill and every step
    h, a, mu, cache = model.step(tokens, u_seq, positions, cache, kv_mask=kv_mask, layers=layers)
    p_next = positions[:b, -1, 0] + 1
    init = dict(
        cache=cache,
        h=h[:b, -1],
        a=a[:, -1],
        mu=mu[:, -1],
        mode=jnp.where(opens, IMAGE, TEXT),
        j=jnp.zeros((b,), jnp.int32),
        p=p_next,  # the next text id
        p0=p_next,  # the open image's first id
        n_img=opens.astype(jnp.int32),
        since=jnp.zeros((b,), jnp.int32),  # text tokens since the last image
        n=jnp.zeros((b,), jnp.int32),
        reason=jnp.zeros((b,), jnp.int32),
        out=jnp.full((b, cfg.max_new), -1, jnp.int32),
        u=jnp.zeros((b, slots, big_l, c), jnp.float32),
    )
    if cfg.reencode:  # what was fed at each cache slot, and where each row's image starts
        pad = size - tokens.shape[1]
        init["hist"] = dict(
            tok=jnp.pad(tokens, ((0, 0), (0, pad))),
            u=jnp.pad(u_seq, ((0, 0), (0, pad), (0, 0))),
            pos=jnp.pad(positions, ((0, 0), (0, pad), (0, 0))),
            mask=jnp.pad(kv_mask, ((0, 0), (0, pad))),
        )
        init["img_slot"] = jnp.full((b,), tokens.shape[1], jnp.int32)
    stop = jnp.asarray(cfg.stop_tokens or (-2,), jnp.int32)
    pick = functools.partial(
        pick_token, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p
    )

    def guide(a, mu):
        """(a, mu) of every cache row -> the conditional rows' (mu, sigma), CFG-mixed."""
        sigma = model.deep.sigma(a)
        if not guided:
            return mu, sigma
        return gaussian_product(mu[:b], sigma[:b], mu[b:], sigma[b:], cfg.guidance)

    def body(s):
        keys = jax.vmap(position_key)(key, s["n"])
        room = jnp.minimum(cfg.max_new - s["n"], size - s["cache"].index)
        # text mode: the next token from the LM head
        late = s["n_img"] >= cfg.max_images
        if cfg.image_every:  # images open on the schedule only
            due = (s["since"] >= cfg.image_every) & ~late
            late = late | ~due

        def next_token(h):
            logits = model.logits(h[:, None])[:, 0].astype(jnp.float32)
            vocab = jnp.arange(logits.shape[-1])
            banned = (vocab == img_id) | (vocab == ve_id)  # only image mode writes these
            logits = jnp.where(banned | ((vocab == vs_id) & late[:, None]), -jnp.inf, logits)
            return jax.vmap(pick)(logits, keys)

        text = s["mode"] == TEXT
        # The LM head (a vocabulary-wide matmul) only when some row is in text mode.
        tok = jax.lax.cond(jnp.any(text), next_token, lambda h: jnp.zeros((b,), jnp.int32), s["h"])
        if cfg.image_every:
            tok = jnp.where(due, vs_id, tok)
        no_room = text & (tok == vs_id) & (room < big_l + 2)  # vs, L latents, ve
        # image mode: the next latent, or <vision_end> after the last
        mu_e, sigma_e = guide(s["a"], s["mu"])
        eps = jax.vmap(lambda k: jax.random.normal(k, (c,), jnp.float32))(keys)
        u = mu_e + sigma_e * (cfg.image_temperature * eps)
        image = s["mode"] == IMAGE
        latent = image & (s["j"] < big_l)
        closing = image & ~latent
        feed_tok = jnp.where(text, tok, jnp.where(latent, img_id, ve_id))
        live = (text & ~no_room) | image
        jj = jnp.minimum(s["j"], big_l - 1)
        text_pos = jnp.where(closing, s["p0"] + resume, s["p"])
        pos = jnp.where(latent[:, None], s["p0"][:, None] + grid[jj], text_pos[:, None])
        u_feed = jnp.where(latent[:, None], u, 0.0)
        opening = text & (tok == vs_id) & ~no_room
        cache = s["cache"]
        feed_tok_r, u_r, pos_r, mask_r = feed_tok, u_feed, pos, live
        if guided:
            cache = _clear_rows(cache, jnp.concatenate([jnp.zeros((b,), bool), opening]))
            pos_u = jnp.where(latent[:, None], p0_u[:, None] + grid[jj], 0)
            feed_tok_r = jnp.concatenate([feed_tok, feed_tok])
            u_r = jnp.concatenate([u_feed, u_feed])
            pos_r = jnp.concatenate([pos, pos_u])
            mask_r = jnp.concatenate([live, opening | latent])
        index = cache.index
        h, a, mu, cache = model.step(
            feed_tok_r[:, None],
            u_r[:, None],
            pos_r[:, None],
            cache,
            kv_mask=mask_r[:, None],
            layers=layers,
        )
        n = s["n"] + live
        r = jnp.arange(b)
        slot = jnp.clip(s["n_img"] - 1, 0, slots - 1)
        out_u = s["u"].at[r, slot, jj].set(jnp.where(latent[:, None], u, s["u"][r, slot, jj]))
        extra = {}
        if cfg.reencode:
            hist = s["hist"]
            if guided:
                clear = jnp.concatenate([jnp.zeros((b,), bool), opening])
                hist = dict(hist, mask=jnp.where(clear[:, None], False, hist["mask"]))
            hist = dict(
                tok=hist["tok"].at[:, index].set(feed_tok_r),
                u=hist["u"].at[:, index].set(u_r),
                pos=hist["pos"].at[:, index].set(pos_r),
                mask=hist["mask"].at[:, index].set(mask_r),
            )
            redo = functools.partial(_reencode, model, layers, closing, keys, index)
            image_u = out_u[r, slot]
            hist, h, a, mu, cache = jax.lax.cond(
                jnp.any(closing),
                redo,
                lambda *args: args[:1] + args[2:],
                hist,
                (image_u, s["img_slot"]),
                h,
                a,
                mu,
                cache,
            )
            extra = dict(hist=hist, img_slot=jnp.where(opening, index + 1, s["img_slot"]))
        at = jnp.minimum(s["n"], cfg.max_new - 1)
        out = s["out"].at[r, at].set(jnp.where(live, feed_tok, s["out"][r, at]))
        stopped = text & jnp.isin(tok, stop) & live
        reason = jnp.where(
            s["mode"] == DONE,
            s["reason"],
            jnp.where(
                no_room,
                3,
                jnp.where(stopped, 1, jnp.where((n >= cfg.max_new) & live, 2, 0)),
            ),
        )
        mode = jnp.where(opening, IMAGE, s["mode"])
        mode = jnp.where(closing, TEXT, mode)
        mode = jnp.where(reason > 0, DONE, mode)
        return dict(
            cache=cache,
            h=jnp.where(live[:, None], h[:b, 0], s["h"]),
            a=a[:, 0],
            mu=mu[:, 0],
            mode=mode,
            j=jnp.where(opening, 0, s["j"] + latent),
            p=jnp.where(closing, s["p0"] + resume + 1, jnp.where(text & live, s["p"] + 1, s["p"])),
            p0=jnp.where(opening, s["p"] + 1, s["p0"]),
            n_img=s["n_img"] + opening,
            since=jnp.where(text & live, s["since"] + 1, 0),
            n=n,
            reason=reason,
            out=out,
            u=out_u,
            **extra,
        )

    chunk = cfg.jacobi_chunk
    offsets = jnp.arange(chunk)

    def jacobi_body(s):
        """K = `jacobi_chunk` latents of every image row at once: the window's slots hold
        u_j .. u_{j+K-1} at fixed cache slots; slot i's (a, mu) give u_{j+i+1}. u_j is exact
        from the start, and after call k so are u_j .. u_{j+k} (a triangular system): at most
        K calls, the last writing the cache from exact inputs. Stops early when the latents
        move by no more than `jacobi_tol` (`flow.jacobi.relative_change`)."""
        keys = jax.vmap(lambda k, n: jax.vmap(lambda i: position_key(k, n + i))(offsets))(
            key, s["n"]
        )
        eps = cfg.image_temperature * jax.vmap(
            jax.vmap(lambda k: jax.random.normal(k, (c,), jnp.float32))
        )(keys)  # (b, K, C)
        latent = s["mode"] == IMAGE
        mu0, sigma0 = guide(s["a"], s["mu"])
        first = mu0 + sigma0 * eps[:, 0]
        ids = grid[s["j"][:, None] + offsets]  # (b, K, 3)
        pos = s["p0"][:, None, None] + ids
        tok = jnp.full((b, chunk), img_id, jnp.int32)
        mask = jnp.broadcast_to(latent[:, None], (b, chunk))
        if guided:
            pos = jnp.concatenate([pos, p0_u[:, None, None] + ids])
            tok, mask = jnp.concatenate([tok, tok]), jnp.concatenate([mask, mask])
        start = s["cache"].index

        def call(g, cache):
            feed = jnp.concatenate([g, g]) if guided else g
            h, a, mu, cache = model.step(tok, feed, pos, cache, kv_mask=mask, layers=layers)
            mu_c, sigma_c = guide(a, mu)  # slot i -> latent j + i + 1
            nxt = mu_c[:, :-1] + sigma_c[:, :-1] * eps[:, 1:]
            nxt = jnp.concatenate([first[:, None], nxt], 1)
            nxt = jnp.where(latent[:, None, None], nxt, 0.0)
            return nxt, h, a, mu, cache

        def iterate(st):
            i, g, _, _, _, _, cache = st
            # the window's slots again, from the adapter's history before the window
            again_from = cache.at(start).replace(recent_u=s["cache"].recent_u)
            g_new, h, a, mu, cache = call(g, again_from)
            change = relative_change(g_new, g, jnp.ones((chunk,), bool))  # the worst row
            return i + 1, g_new, change, h, a, mu, cache

        def again(st):
            return (st[0] < chunk) & ((st[0] == 0) | (st[2] > cfg.jacobi_tol))

        g0 = jnp.where(latent[:, None, None], jnp.concatenate([first[:, None], eps[:, 1:]], 1), 0)
        shapes = jax.eval_shape(lambda g: call(g, s["cache"])[1:4], g0)
        outs = [jnp.zeros(x.shape, x.dtype) for x in shapes]  # h, a, mu: set by the 1st call
        init = (jnp.zeros((), jnp.int32), g0, jnp.float32(jnp.inf), *outs, s["cache"])
        calls, g, _, h, a, mu, cache = jax.lax.while_loop(again, iterate, init)
        r = jnp.arange(b)
        slot = jnp.clip(s["n_img"] - 1, 0, slots - 1)
        u_img = jax.vmap(lambda img, j, v: jax.lax.dynamic_update_slice_in_dim(img, v, j, 0))(
            s["u"][r, slot], s["j"], g
        )
        out_at = s["n"][:, None] + offsets
        out = jax.vmap(lambda o, at: o.at[at].set(img_id, mode="drop"))(s["out"], out_at)
        out = jnp.where(latent[:, None], out, s["out"])
        return dict(
            s,
            cache=cache,
            h=jnp.where(latent[:, None], h[:b, -1], s["h"]),
            a=a[:, -1],
            mu=mu[:, -1],
            j=s["j"] + chunk * latent,
            n=s["n"] + chunk * latent,
            out=out,
            u=s["u"].at[r, slot].set(jnp.where(latent[:, None, None], u_img, s["u"][r, slot])),
            since=jnp.where(latent, 0, s["since"]),
            calls=s["calls"] + calls,
        )

    def step(s):
        image = s["mode"] == IMAGE
        latent = image & (s["j"] < big_l)
        j0 = jnp.max(jnp.where(latent, s["j"], -1))
        aligned = (
            jnp.any(latent)
            & jnp.all(latent | (s["mode"] == DONE))
            & jnp.all(~latent | (s["j"] == j0))
            & (s["cache"].index + chunk <= size)
        )
        return jax.lax.cond(aligned, jacobi_body, lambda s: dict(body(s), calls=s["calls"]), s)

    def cond(s):
        return jnp.any(s["mode"] != DONE) & (s["cache"].index < size)

    if chunk:
        init["calls"] = jnp.zeros((), jnp.int32)
    s = jax.lax.while_loop(cond, step if chunk else body, init)
    reason = jnp.where(s["mode"] != DONE, 3, s["reason"])  # the cache ran out
    x = model.shallow_inverse(s["u"].reshape(b * slots, big_l, c))
    return dict(
        tokens=s["out"],
        reason=reason,
        n_images=s["n_img"],
        u=s["u"],
        x=x.reshape(s["u"].shape),
        jacobi_calls=s.get("calls", jnp.zeros((), jnp.int32)),
        overflowed=s["cache"].overflowed,
    )


@functools.partial(jax.jit, static_argnums=0)
def _context_u(graphdef, state, images, keys):
    """Context images (N, H, W, 3) -> u through the FAE path, each noise-augmented as in
    training with its own key (N,)."""
    model = nnx.merge(graphdef, state)
    x = model.noisy_latents(images, None)
    noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys)
    u, _ = model.shallow_forward(x + model.cfg.sigma_a * noise)
    return u


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, x):
    return nnx.merge(graphdef, state).decode(x)


def right_align(
    rows: list[np.ndarray], positions: list[np.ndarray], pad_id: int, multiple=1, longest=0
):
    """Token rows (and their (n, 3) M-RoPE ids) -> (tokens, positions, kv_mask) right-aligned,
    the length (at least `longest`) rounded up to `multiple` (fewer compiled shapes)."""
    length = -(-max(longest, *(len(r) for r in rows)) // multiple) * multiple
    b = len(rows)
    tokens = np.full((b, length), pad_id, np.int32)
    pos = np.zeros((b, length, 3), np.int32)
    mask = np.zeros((b, length), bool)
    for i, (r, p) in enumerate(zip(rows, positions, strict=True)):
        tokens[i, length - len(r) :] = r
        pos[i, length - len(r) :] = p
        mask[i, length - len(r) :] = True
    return tokens, pos, mask


def _check_negative(negative: list, prompts: list, cfg: SampleConfig, vs: int) -> None:
    why = None
    if cfg.guidance <= 0:
        why = "it is CFG's unconditional row: set guidance > 0"
    elif len(negative) != len(prompts):
        why = f"give one per prompt ({len(prompts)}), got {len(negative)}"
    elif cfg.max_images != 1 or cfg.reencode:
        why = "it serves text-to-image only: max_images 1, no reencode"
    elif any(len(p[0]) == 0 or p[0][-1] != vs or len(p[2]) for p in prompts):
        why = "every prompt must be text ending in <vision_start> (text-to-image)"
    elif any(len(r) == 0 or r[-1] != vs for r in negative):
        why = "every negative prompt must end in <vision_start>, like its prompt"
    if why:
        raise ValueError(f"negative prompts: {why}")


def text_positions(n: int, start: int = 0) -> np.ndarray:
    return np.repeat((start + np.arange(n))[:, None], 3, axis=1).astype(np.int32)


def prompt_arrays(model: Pretzel, prompts: list, keys: jax.Array, pad_id: int, longest=0):
    """Prompts (tokens (n,), positions (n, 3), images (k, H, W, 3) uint8 in the order of the
    row's image slots) and row keys -> right-aligned (tokens, positions, kv_mask, u_seq), at
    least `longest` slots long: each context image enters once, through the FAE path,
    noise-augmented as in training."""
    big_l = model.cfg.latents_per_image
    tokens, positions, mask = right_align(
        [p[0] for p in prompts], [p[1] for p in prompts], pad_id, multiple=16, longest=longest
    )
    images = [img for p in prompts for img in p[2]]
    u_seq = np.zeros((*tokens.shape, model.cfg.flow.token_dim), np.float32)
    if images:
        image_keys = jnp.stack(
            [context_key(keys[i], k) for i, p in enumerate(prompts) for k in range(len(p[2]))]
        )
        u = np.asarray(_context_u(*nnx.split(model), np.stack(images), image_keys))
        k = 0
        for i, p in enumerate(prompts):
            slots = np.flatnonzero(tokens[i] == model.cfg.vlm.image_token_id)
            n = len(p[2])
            if len(slots) != n * big_l:
                raise ValueError(
                    f"prompt {i} has {len(slots)} latent slots for {n} images of {big_l} latents"
                )
            if n:
                u_seq[i, slots] = u[k : k + n].reshape(n * big_l, -1)
            k += n
    return tokens, positions, mask, u_seq


def sample(
    model: Pretzel,
    prompts: list,
    key: jax.Array,
    cfg: SampleConfig,
    *,
    pad_id: int,
    negative: list[np.ndarray] | None = None,
):
    """Prompts as `prompt_arrays` takes them (a prompt ending in `<vision_start>` opens an
    image) and one key, or one per prompt (a row samples the same in any batch) -> per row
    dict(tokens: the generated ids (`<vision_start>`, latent slots and `<vision_end>`
    included), reason (`STOP_REASONS`), u / x (k, L, C) and images (k, H, W, 3) float in
    [0, 1] (with an FAE) of its k generated images).

    `negative` (text-to-image with CFG only: every prompt ends in `<vision_start>`,
    `max_images` 1): one token row per prompt, text ending in `<vision_start>`, that takes the
    empty prompt's place as CFG's unconditional row."""
    big_l = model.cfg.latents_per_image
    if cfg.max_new < 1:
        raise ValueError(f"SampleConfig.max_new must be >= 1, got {cfg.max_new}")
    vs = model.cfg.vlm.vision_start_token_id
    keys = row_keys(key, len(prompts))
    neg, longest = None, 0
    if negative is not None:  # right-aligned to the prompts' length
        _check_negative(negative, prompts, cfg, vs)
        longest = max(len(r) for r in [*negative, *(p[0] for p in prompts)])
        ids = [text_positions(len(r)) for r in negative]
        neg = right_align(list(negative), ids, pad_id, multiple=16, longest=longest)
    tokens, positions, mask, u_seq = prompt_arrays(model, prompts, keys, pad_id, longest)
    if (tokens[:, -1] == vs).any() and (cfg.max_new < big_l + 1 or cfg.max_images < 1):
        raise ValueError(
            f"a prompt ends in <vision_start>: it needs max_new >= {big_l + 1} (the image and "
            f"<vision_end>) and max_images >= 1, got {cfg.max_new} and {cfg.max_images}"
        )
    k = cfg.jacobi_chunk
    if k < 0 or (k and big_l % k) or (k and cfg.reencode):
        raise ValueError(
            f"SampleConfig.jacobi_chunk must be 0 or divide the {big_l} latents per image (and "
            f"not be combined with reencode), got {k}"
        )
    size = tokens.shape[1] + cfg.max_new
    graphdef, state = nnx.split(model)
    out = _sample(graphdef, cfg, size, state, tokens, positions, mask, u_seq, keys, neg)
    out = jax.tree.map(np.asarray, out)
    if out["overflowed"]:  # rows stop before the cache runs out: this would be a sampler bug
        raise RuntimeError(f"the sampler wrote past its {size}-slot cache")
    images = None
    if model.fae is not None:
        x = out["x"]
        images = np.asarray(_decode(graphdef, state, x.reshape(-1, *x.shape[2:])))
        images = images.reshape(*x.shape[:2], *images.shape[1:])
    rows = []
    for i in range(len(prompts)):
        ids = out["tokens"][i]
        k = int(min(out["n_images"][i], out["u"].shape[1]))
        row = dict(
            tokens=[int(t) for t in ids[ids >= 0]],
            reason=STOP_REASONS[int(out["reason"][i])],
            u=out["u"][i, :k],
            x=out["x"][i, :k],
            jacobi_calls=int(out["jacobi_calls"]),  # the batch's block-Jacobi model calls
        )
        if images is not None:
            row["images"] = images[i, :k]
        rows.append(row)
    return rows
