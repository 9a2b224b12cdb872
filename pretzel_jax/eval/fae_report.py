"""End-of-run report of an FAE training (model kind "fae").

1. Latent normalisation statistics: per-channel mean/std of the posterior means over
   `report.stats_batches` training batches, written into the model's frozen `latent_norm`
   (phase "feature"; phase "pixel_adapt" keeps the ones it was initialised with).
2. `fae.safetensors` in the run folder (all weights + the statistics): phase "pixel_adapt"'s
   `model.fae.init_from`, and the FAE the flow stages use.
3. On `report.images` freshly rendered shapes scenes (never in the training set: a seed of their
   own; and as many from the held-out compositional split): PSNR of encode -> decode without and
   with latent noise at `sigma_a`, the shapes judge's scene accuracy on originals and on both
   reconstructions, and the per-channel variance of the normalised latents.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretzel_jax.fae import weights
from pretzel_jax.fae.model import FAE, as_float, to_uint8

log = logging.getLogger(__name__)
REPORT_SEED = 20_261_123  # the held-out renders' own seed


@nnx.jit
def _posterior_mean(model: FAE, images: jax.Array) -> jax.Array:
    return model.latent_encoder(model.features(as_float(images)))[0]


@nnx.jit
def _reconstruct(model: FAE, images: jax.Array, sigma: jax.Array, key: jax.Array):
    latents = model.encode(images)
    return model.decode(latents + sigma * jax.random.normal(key, latents.shape)), latents


def latent_stats(model: FAE, batches) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the (unnormalised) posterior means over `batches`."""
    total, total_sq, count = 0.0, 0.0, 0
    for batch in batches:
        mean = np.asarray(_posterior_mean(model, batch["image"]), np.float64)
        mean = mean.reshape(-1, mean.shape[-1])
        total, total_sq = total + mean.sum(0), total_sq + np.square(mean).sum(0)
        count += len(mean)
    mu = total / count
    std = np.sqrt(np.maximum(total_sq / count - mu**2, 0.0))
    return mu.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def set_latent_stats(model: FAE, mean: np.ndarray, std: np.ndarray) -> None:
    model.latent_norm["mean"][...] = jnp.asarray(mean)
    model.latent_norm["std"][...] = jnp.asarray(std)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of PSNR (dB) between float images in [0, 1]."""
    mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)), axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def reconstruct(model: FAE, images: np.ndarray, sigma: float, key, chunk: int = 64):
    """encode -> (+ sigma * noise) -> decode, in chunks; -> (images float [0, 1], latents)."""
    outs, lats = [], []
    for i in range(0, len(images), chunk):
        sub = jax.random.fold_in(key, i)
        out, lat = _reconstruct(model, images[i : i + chunk], jnp.float32(sigma), sub)
        outs.append(np.asarray(out))
        lats.append(np.asarray(lat))
    return np.concatenate(outs), np.concatenate(lats)


def _to_input_size(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    return np.asarray(jax.image.resize(images, (len(images), size, size, 3), "bilinear"))


def evaluate(model: FAE, n: int, key, judge=None) -> dict[str, float]:
    from pretzel_jax.eval.shapes_judge import attribute_accuracy, render_batch

    cfg = model.cfg
    out = {}
    for split, heldout in (("", False), ("heldout_", True)):
        rng = np.random.default_rng(REPORT_SEED + heldout)
        images, scenes = render_batch(rng, n, cfg.image_size, heldout=heldout)
        originals = as_float(images)
        for name, sigma in (("clean", 0.0), ("noisy", cfg.sigma_a)):
            recon, latents = reconstruct(model, images, sigma, key)
            recon = _to_input_size(recon, cfg.image_size)
            out[f"{split}psnr_{name}"] = psnr(np.asarray(originals), recon)
            if judge is not None:
                acc = attribute_accuracy(judge, np.asarray(to_uint8(recon)), scenes)
                out[f"{split}scene_acc_{name}"] = acc["scene"]
        if judge is not None:
            out[f"{split}scene_acc_original"] = attribute_accuracy(judge, images, scenes)["scene"]
        if not heldout:
            var = latents.reshape(-1, latents.shape[-1]).var(0)
            out |= {
                "latent_var_min": float(var.min()),
                "latent_var_mean": float(var.mean()),
                "latent_var_max": float(var.max()),
                "latent_mean_abs_max": float(
                    np.abs(latents.reshape(-1, latents.shape[-1]).mean(0)).max()
                ),
            }
    return out


def report(model: FAE, config, data, key, run_dir: str) -> dict[str, float]:
    rep = config.model.fae.report
    run_dir = Path(run_dir)
    out = {}
    if model.cfg.phase == "feature":
        train_split = config.data.train_split
        batches = (b for _, b in zip(range(rep.stats_batches), data(train_split)))
        mean, std = latent_stats(model, batches)
        set_latent_stats(model, mean, std)
        out["latent_std_min"] = float(std.min())
        out["latent_std_max"] = float(std.max())
    if rep.export and jax.process_index() == 0:
        path = weights.save(model, run_dir / "fae.safetensors")
        log.info("FAE weights and latent statistics: %s", path)
    if rep.images:
        judge = None
        if rep.judge:
            from pretzel_jax.eval import shapes_judge

            judge = shapes_judge.load()
        out |= evaluate(model, rep.images, key, judge)
    if jax.process_index() == 0:
        (run_dir / "report.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
