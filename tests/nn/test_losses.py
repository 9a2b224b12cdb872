"""Blockwise LM cross-entropy (`pretzel_jax.nn.losses.chunked_cross_entropy`): the masked sum of
optax's integer-label softmax cross-entropy, values and gradients, for chunk sizes that divide the
length and that do not; its correct count is argmax accuracy; and the memory property: the
compiled value-and-gradient never holds a (B, S, V) buffer, which the unchunked loss does."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pretzel_jax.nn.losses import chunked_cross_entropy

B, S, D, V = 2, 48, 16, 97


def _inputs(seed=0, b=B, s=S, d=D, v=V):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    targets = rng.integers(0, v, (b, s))
    # Half the targets are the argmax, so the correct count is far from 0 and from the total.
    argmax = np.asarray(jnp.argmax(hidden @ head, -1))
    targets = jnp.asarray(np.where(rng.random((b, s)) < 0.5, argmax, targets), jnp.int32)
    mask = jnp.asarray(rng.random((b, s)) < 0.8)
    return hidden, head, targets, mask


def _reference(hidden, head, targets, mask):
    logits = jnp.einsum("bsd,dv->bsv", hidden, head, precision=jax.lax.Precision.HIGHEST)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * mask)


def _chunked(chunk, **kw):
    def loss(hidden, head, targets, mask):
        return chunked_cross_entropy(hidden, head, targets, mask, chunk=chunk, **kw)[0]

    return loss


@pytest.mark.parametrize("chunk", [16, 48, 10, 7, 1, 100], ids=lambda c: f"chunk{c}")
def test_values_and_gradients_equal_optax(chunk):
    # 16 and 48 divide S = 48; 10 and 7 do not (padded tail); 100 > S is clipped to S.
    args = _inputs()
    with jax.default_matmul_precision("highest"):
        ref, ref_grads = jax.value_and_grad(_reference, argnums=(0, 1))(*args)
        got, got_grads = jax.jit(jax.value_and_grad(_chunked(chunk), argnums=(0, 1)))(*args)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for name, g, r in zip(("hidden", "head"), got_grads, ref_grads, strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    # Masked positions get no gradient.
    assert float(jnp.max(jnp.abs(got_grads[0] * ~args[3][..., None]))) == 0.0


@pytest.mark.parametrize("chunk", [16, 10])
def test_correct_count_is_argmax_accuracy(chunk):
    hidden, head, targets, mask = _inputs(seed=1)
    _, correct = jax.jit(lambda *a: chunked_cross_entropy(*a, chunk=chunk))(
        hidden, head, targets, mask
    )
    hits = (jnp.argmax(hidden @ head, -1) == targets) & mask
    assert float(correct) == float(jnp.sum(hits))
    assert 0 < float(correct) < float(jnp.sum(mask))


def test_bf16_compute_stays_close_to_fp32():
    args = _inputs(seed=2)
    with jax.default_matmul_precision("highest"):
        ref = _reference(*args)
    got = jax.jit(_chunked(16, compute_dtype=jnp.bfloat16))(*args)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=2e-2)


# -- memory: no (B, S, V) buffer -----------------------------------------------------------------

_SHAPE = re.compile(r"\b(?:f64|f32|bf16|f16|s64|s32|s16|s8|u32|u8|pred)\[([\d,]*)\]")


def _largest_buffer(fn, *args) -> int:
    """Elements of the largest array in the compiled HLO of `fn` (any dtype, any layout)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    sizes = [int(np.prod([int(d) for d in m.split(",") if d])) for m in _SHAPE.findall(text)]
    return max(sizes)


def test_value_and_grad_never_holds_the_full_logits():
    b, s, v, d, chunk = 2, 512, 32768, 64, 64
    args = (
        jax.ShapeDtypeStruct((b, s, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
        jax.ShapeDtypeStruct((b, s), jnp.bool_),
    )
    full = b * s * v
    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))  # noqa: E731
    # The unchunked reference materialises (B, S, V) logits (so this check can fail) ...
    assert _largest_buffer(grad(_reference), *args) >= full
    # ... the blockwise loss at most one (B, chunk, V) block, forward and backward.
    largest = _largest_buffer(grad(_chunked(chunk)), *args)
    assert largest < full
    assert largest <= b * chunk * v
