"""Invariants every flow change must keep (DESIGN.md section 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from randomize import randomized

from pretzel_jax.flow import DeepShallowFlow, FlowConfig, gaussian_product


def make_flow(seed=0, **kw):
    base = dict(token_dim=3, width=32, head_dim=16, layers_per_block=(1, 1, 2), context_dim=5)
    return randomized(DeepShallowFlow(FlowConfig(**(base | kw)), rngs=nnx.Rngs(seed)), seed + 1)


VARIANTS = [
    dict(),  # STARFlow: SOS, softplus, soft clip
    dict(use_sos=False),  # TarFlow shift
    dict(use_softplus=False, soft_clip=0.0),  # exp scale, no clip
    dict(context_dim=0),  # unconditional
]


def _inputs(cfg, b=2, n=6, lc=4):
    x = jax.random.normal(jax.random.key(10), (b, n, cfg.token_dim))
    ctx = None
    if cfg.context_dim:
        ctx = jax.random.normal(jax.random.key(11), (b, lc, cfg.context_dim))
    return x, ctx


@pytest.mark.parametrize("variant", VARIANTS)
def test_inverse_of_forward_is_identity_for_every_block_and_the_stack(variant):
    flow = make_flow(**variant)
    x, ctx = _inputs(flow.config)

    @nnx.jit  # one program instead of one per operation: a fraction of the compile time
    def round_trips(flow):
        per_block = []
        for block in flow.blocks:
            c = ctx if block.conditioned else None
            z, _ = block.forward(x, c)
            per_block.append((z, block.inverse(z, c)))
        z, _ = flow.forward(x, ctx)
        return per_block, flow.inverse(z, ctx)

    per_block, x_back = round_trips(flow)
    for i, (z, x_block) in enumerate(per_block):
        assert float(jnp.abs(z - x).max()) > 1e-2, "block is (near) identity: test is vacuous"
        np.testing.assert_allclose(x_block, x, atol=1e-4, err_msg=f"block {i}")
    np.testing.assert_allclose(x_back, x, atol=1e-4)


def test_context_padding_mask_is_respected_in_forward_and_inverse():
    flow = make_flow()
    x, ctx = _inputs(flow.config)
    mask = jnp.array([[True, True, False, False], [True, True, True, True]])
    garbage = ctx.at[0, 2:].set(100.0)

    @nnx.jit
    def run(flow):
        z1, ld1 = flow.forward(x, ctx, mask)
        z2, ld2 = flow.forward(x, garbage, mask)
        return z1, ld1, z2, ld2, flow.inverse(z1, garbage, mask)

    z1, ld1, z2, ld2, x_back = run(flow)
    np.testing.assert_allclose(z1, z2, atol=1e-6)
    np.testing.assert_allclose(ld1, ld2, atol=1e-5)
    np.testing.assert_allclose(x_back, x, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_logdet_equals_slogdet_of_the_jacobian(variant):
    flow = make_flow(**(variant | dict(token_dim=2)))
    x, ctx = _inputs(flow.config, b=1, n=4)

    def f(flat):
        z, _ = flow.forward(flat.reshape(1, 4, 2), ctx)
        return z.reshape(-1)

    jac = jax.jit(jax.jacfwd(f))(x.reshape(-1))
    sign, expected = jnp.linalg.slogdet(jac)
    _, logdet = jax.jit(lambda x: flow.forward(x, ctx))(x)
    assert float(sign) != 0
    np.testing.assert_allclose(logdet[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", [dict(), dict(use_sos=False)])
@pytest.mark.parametrize("block_index", [1, 2])  # 1: flip, 2: deep (identity)
def test_causality_changing_token_k_leaves_earlier_parameters_unchanged(variant, block_index):
    flow = make_flow(**variant)
    block = flow.blocks[block_index]
    x, ctx = _inputs(flow.config, n=8)
    c = ctx if block.conditioned else None
    params = nnx.jit(lambda block, x: block.params(x, c))  # one program for all nine calls
    _, mu, sigma, xp = params(block, x)
    for k in range(8):  # k counts in the block's own (permuted) order
        xp2 = xp.at[:, k].add(1.0)
        x2 = jnp.flip(xp2, 1) if block.permutation == "flip" else xp2
        _, mu2, sigma2, _ = params(block, x2)
        np.testing.assert_allclose(mu2[:, : k + 1], mu[:, : k + 1], atol=1e-6)
        np.testing.assert_allclose(sigma2[:, : k + 1], sigma[:, : k + 1], atol=1e-6)
        if k < 7:
            assert float(jnp.abs(mu2[:, k + 1 :] - mu[:, k + 1 :]).max()) > 1e-6


@pytest.mark.parametrize("variant", [dict(), dict(use_sos=False)])
def test_cached_inverse_matches_teacher_forced_parameters_token_for_token(variant):
    flow = make_flow(**variant)
    block = flow.deep
    z = jax.random.normal(jax.random.key(3), (2, 7, 3))
    _, ctx = _inputs(flow.config)

    @nnx.jit
    def run(block):
        x, (mu_dec, sigma_dec) = block.inverse(z, ctx, return_params=True)
        _, mu, sigma, _ = block.params(x, ctx)
        return mu_dec, sigma_dec, mu, sigma

    mu_dec, sigma_dec, mu, sigma = run(block)
    np.testing.assert_allclose(mu_dec, mu, atol=1e-5)
    np.testing.assert_allclose(sigma_dec, sigma, atol=1e-5)


@pytest.mark.parametrize("rule", ["product", "additive"])
def test_cfg_weight_zero_equals_conditional_sampling(rule):
    flow = make_flow()
    z = jax.random.normal(jax.random.key(4), (2, 6, 3))
    _, ctx = _inputs(flow.config)
    uncond = jax.random.normal(jax.random.key(5), ctx.shape)
    cond = flow.inverse(z, ctx)
    guided = flow.inverse(z, ctx, guidance=0.0, uncond_context=uncond, guidance_rule=rule)
    np.testing.assert_allclose(guided, cond, atol=1e-5)
    strong = flow.inverse(z, ctx, guidance=3.0, uncond_context=uncond, guidance_rule=rule)
    assert float(jnp.abs(strong - cond).max()) > 1e-3


@pytest.mark.parametrize("rule", ["product", "additive"])
def test_cfg_with_identical_cond_and_uncond_is_the_identity(rule):
    flow = make_flow()
    z = jax.random.normal(jax.random.key(6), (2, 6, 3))
    _, ctx = _inputs(flow.config)
    cond = flow.inverse(z, ctx)
    guided = flow.inverse(z, ctx, guidance=4.0, uncond_context=ctx, guidance_rule=rule)
    np.testing.assert_allclose(guided, cond, atol=1e-5)


def test_gaussian_product_rule_matches_the_product_density_and_stays_valid():
    mu_c, sigma_c, mu_u, sigma_u, w = 0.3, 0.5, -0.2, 0.9, 2.0
    mu, sigma = gaussian_product(mu_c, sigma_c, mu_u, sigma_u, w)
    # N_c^(1+w) / N_u^w: precision (1+w)/sc^2 - w/su^2, mean from the natural parameters.
    prec = (1 + w) / sigma_c**2 - w / sigma_u**2
    np.testing.assert_allclose(1 / sigma**2, prec, rtol=1e-5)
    np.testing.assert_allclose(
        mu, ((1 + w) * mu_c / sigma_c**2 - w * mu_u / sigma_u**2) / prec, rtol=1e-5
    )
    # sigma_u < sigma_c would make the precision negative: the clip keeps sigma <= sigma_c.
    _, sigma_clip = gaussian_product(0.0, 1.0, 0.0, 0.5, 5.0)
    assert np.isfinite(sigma_clip) and sigma_clip <= 1.0


def test_zero_initialised_heads_make_a_fresh_flow_the_identity():
    flow = DeepShallowFlow(FlowConfig(token_dim=3, width=32, head_dim=16), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    z, logdet = nnx.jit(lambda flow: flow.forward(x))(flow)
    np.testing.assert_allclose(z, x, atol=1e-6)
    np.testing.assert_allclose(logdet, 0.0, atol=1e-5)


def test_bad_flow_config_names_the_key():
    with pytest.raises(ValueError, match="FlowConfig.width"):
        FlowConfig(token_dim=3, width=30, head_dim=16)
    with pytest.raises(ValueError, match="FlowConfig.permutations"):
        FlowConfig(token_dim=3, permutations=("flip",))
