"""End-of-run report of an ImageFlow: held-out bits/dim (flow vs a diagonal-Gaussian baseline)
and a PNG grid of CFG samples, one row per class."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.eval.baselines import diagonal_gaussian_bits_per_dim
from pretzel_jax.eval.image_grid import save_grid
from pretzel_jax.flow.image_flow import ImageFlow
from pretzel_jax.flow.noise import unit_range_to_levels


def _collect(batches: Iterator[dict]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for b in batches:
        images.append(np.asarray(b["image"]))
        labels.append(np.asarray(b["label"]))
    return np.concatenate(images), np.concatenate(labels)


BitsPerDim = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _bpd_fn(model: ImageFlow) -> BitsPerDim:
    """`(images, labels, key) -> (B,)` bits/dim, one jitted program for every call."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(
        lambda state, images, labels, key: nnx.merge(graphdef, state).bits_per_dim(
            images, labels, key
        )
    )
    return lambda images, labels, key: fn(state, images, labels, key)


def heldout_bits_per_dim(bpd: BitsPerDim, images, labels, key, draws: int) -> float:
    """Mean bits/dim over all examples, averaged over `draws` dequantisation samples."""
    return float(np.mean([jnp.mean(bpd(images, labels, k)) for k in jax.random.split(key, draws)]))


def marginal_bits_per_dim(bpd: BitsPerDim, images, class_prior, key, draws: int) -> float:
    """Bits/dim of the class-conditional flow's marginal p(x) = sum_y p(y) p(x|y): the fair
    comparison with an unconditional model. Every class sees the same dequantised x, so each
    draw is a valid bound on the discrete marginal likelihood."""
    dims = math.prod(images.shape[1:])
    log_prior = jnp.log(jnp.asarray(class_prior))
    out = []
    for k in jax.random.split(key, draws):
        per_class = jnp.stack(
            [bpd(images, jnp.full(len(images), y, jnp.int32), k) for y in range(len(class_prior))]
        )  # (classes, B) bits/dim
        log_px = jax.nn.logsumexp(-per_class * dims * math.log(2) + log_prior[:, None], axis=0)
        out.append(jnp.mean(-log_px / (dims * math.log(2))))
    return float(np.mean(out))


def sample_grid(model: ImageFlow, key, per_class: int, guidance: float) -> np.ndarray:
    cfg = model.config
    classes = max(cfg.num_classes, 1)
    labels = jnp.repeat(jnp.arange(classes), per_class) if cfg.num_classes else None
    if labels is None:
        labels = jnp.zeros((per_class,), jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def sample(state, key, labels):
        return nnx.merge(graphdef, state).sample(key, labels, guidance=guidance, denoise=True)

    x = sample(state, key, labels)
    levels = np.asarray(unit_range_to_levels(x, cfg.num_levels))
    pixels = (levels * 255 // (cfg.num_levels - 1)).astype(np.uint8)
    return pixels.reshape(classes, per_class, *pixels.shape[1:])


def report(
    model: ImageFlow, config, data: Callable[[str], Iterator[dict]], key, run_dir: str
) -> dict[str, float]:
    rc = config.model.report
    cfg = model.config
    k_bpd, k_sample = jax.random.split(key)
    bpd = _bpd_fn(model)
    test_images, test_labels = _collect(data(rc.split))
    if rc.bpd_examples:
        test_images, test_labels = test_images[: rc.bpd_examples], test_labels[: rc.bpd_examples]
    train_images, train_labels = _collect(data("train"))
    out = {"heldout_examples": float(len(test_images))}
    # Unconditional density p(x) vs the unconditional per-pixel Gaussian.
    out["baseline_gaussian_bits_per_dim"] = diagonal_gaussian_bits_per_dim(
        train_images, test_images, cfg.num_levels
    )
    if cfg.num_classes:
        prior = np.bincount(train_labels, minlength=cfg.num_classes) / len(train_labels)
        px = marginal_bits_per_dim(bpd, test_images, prior, k_bpd, rc.dequant_draws)
        # p(x | y) vs one Gaussian per class; and the null-label (CFG unconditional) branch.
        out["heldout_bits_per_dim_given_label"] = heldout_bits_per_dim(
            bpd, test_images, test_labels, k_bpd, rc.dequant_draws
        )
        out["baseline_gaussian_class_bits_per_dim"] = diagonal_gaussian_bits_per_dim(
            train_images, test_images, cfg.num_levels, train_labels, test_labels
        )
        out["heldout_bits_per_dim_null_label"] = heldout_bits_per_dim(
            bpd, test_images, np.full_like(test_labels, model.null_label), k_bpd, rc.dequant_draws
        )
    else:
        px = heldout_bits_per_dim(bpd, test_images, test_labels, k_bpd, rc.dequant_draws)
    out["heldout_bits_per_dim"] = px
    out["improvement_vs_gaussian"] = 1.0 - px / out["baseline_gaussian_bits_per_dim"]
    grid = sample_grid(model, k_sample, rc.samples_per_class, rc.guidance)
    if jax.process_index() == 0:
        save_grid(grid, os.path.join(run_dir, f"samples_cfg{rc.guidance:g}.png"), scale=4)
        with open(os.path.join(run_dir, "report.json"), "w") as f:
            json.dump(out, f, indent=2)
    return out
