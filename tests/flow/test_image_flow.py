import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretzel_jax.flow import FlowConfig, bits_per_dim, nll_per_dim, tweedie_denoise
from pretzel_jax.flow.image_flow import ImageFlow, ImageFlowConfig, patchify, unpatchify
from pretzel_jax.flow.noise import uniform_dequantize, unit_range_to_levels


def _model(**kw):
    flow = FlowConfig(token_dim=4, width=32, head_dim=16, layers_per_block=(1, 1), context_dim=8)
    cfg = ImageFlowConfig(
        image_shape=(4, 4, 1), patch_size=2, num_levels=17, flow=flow, num_classes=3, **kw
    )
    return ImageFlow(cfg, rngs=nnx.Rngs(0))


def test_patchify_round_trip_and_channel_order():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    t = patchify(x, 2)
    assert t.shape == (2, 4, 12)
    np.testing.assert_array_equal(t[0, 1, :3], x[0, 0, 2])  # (p1, p2, c): channels fastest
    np.testing.assert_array_equal(unpatchify(t, 2, (4, 4, 3)), x)


def test_fresh_model_is_a_standard_gaussian_on_the_dequantised_data():
    model = _model()
    levels = jax.random.randint(jax.random.key(0), (5, 4, 4, 1), 0, 17)
    key = jax.random.key(1)
    labels = jnp.zeros(5, jnp.int32)

    @nnx.jit  # one program instead of one per operation: a fraction of the compile time
    def run(model):
        x = model.to_tokens(levels, key)
        return x, model.log_prob(x, labels), model.bits_per_dim(levels, labels, key)

    x, log_prob, bpd = run(model)
    expected = -0.5 * jnp.sum(x**2, (1, 2)) - 0.5 * 16 * math.log(2 * math.pi)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-5)
    np.testing.assert_allclose(bpd, (-expected / 16 + math.log(17 / 2)) / math.log(2), rtol=1e-5)


def test_bits_per_dim_of_the_uniform_density_is_log2_levels():
    # z = 0 and logdet chosen so that p(x) = 2^-4, the uniform density on [-1, 1]^4: every one of
    # the 16^4 bins then has probability 16^-4, i.e. exactly 4 bits per dimension.
    z = jnp.zeros((1, 4, 1))
    logdet = jnp.array([4 * (0.5 * math.log(2 * math.pi) - math.log(2))])
    np.testing.assert_allclose(bits_per_dim(z, logdet, num_levels=16), 4.0, rtol=1e-6)
    np.testing.assert_allclose(nll_per_dim(z, logdet), -(logdet[0] / 4), rtol=1e-6)


def test_dequantisation_stays_in_its_bin():
    levels = jnp.arange(17).reshape(1, 17)
    x = uniform_dequantize(levels, jax.random.key(0), 17)
    assert float(x.min()) >= -1 and float(x.max()) < 1
    np.testing.assert_array_equal(unit_range_to_levels(x, 17), levels)


def test_tweedie_step_on_a_known_gaussian():
    s = 2.0
    x = jnp.array([[1.0, -3.0]])
    log_p = lambda v: -0.5 * jnp.sum(v**2, -1) / s**2
    np.testing.assert_allclose(tweedie_denoise(log_p, x, 0.5), x - 0.25 * x / s**2, rtol=1e-6)


def test_loss_is_finite_differentiable_and_label_dropout_uses_the_null_row():
    model = _model(label_dropout=1.0)
    head = model.flow.deep.proj_out.kernel  # zero-init: the context would get no gradient at all
    head[...] = 0.1 * jax.random.normal(jax.random.key(1), head.shape)
    batch = {"image": jnp.ones((4, 4, 4, 1), jnp.int32), "label": jnp.array([0, 1, 2, 0])}
    (loss, metrics), grads = nnx.jit(
        nnx.value_and_grad(lambda m: m.loss(batch, jax.random.key(0)), has_aux=True)
    )(model)
    assert np.isfinite(float(loss)) and set(metrics) >= {"bits_per_dim", "logdet", "nll"}
    g = grads.class_embed[...]
    assert float(jnp.abs(g[:3]).max()) == 0.0  # every label dropped
    assert float(jnp.abs(g[3]).max()) > 0.0  # the null row gets all the gradient


def test_sampling_shapes_guidance_and_denoise():
    model = _model(noise="gaussian", noise_std=0.1)
    labels = jnp.array([0, 1])
    x = nnx.jit(lambda m: m.sample(jax.random.key(0), labels, guidance=2.0, denoise=True))(model)
    assert x.shape == (2, 4, 4, 1) and bool(jnp.all(jnp.isfinite(x)))


def test_bad_image_flow_config_names_the_problem():
    flow = FlowConfig(token_dim=5, width=32, head_dim=16)
    with pytest.raises(ValueError, match="token_dim"):
        ImageFlowConfig(image_shape=(4, 4, 1), patch_size=2, num_levels=17, flow=flow)
