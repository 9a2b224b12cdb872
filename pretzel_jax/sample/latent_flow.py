"""Save, load and sample a LatentFlow (a trained or ported text-to-image flow).

    python -m pretzel_jax.sample.latent_flow --ckpt DIR --out samples.npz \
        [--num 4] [--seed 0] [--context ctx.npy] [--guidance 2.0]

A checkpoint directory holds `latent_flow.json` (the LatentFlowConfig and where the weights
came from) and `params/` (an Orbax checkpoint of the parameters). `--context` is a (B, L, dim)
or (L, dim) array of caption features; guidance runs CFG against zeros of the same shape
(STARFlow's null caption features). Samples are latents (B, H, W, C); decoding them to pixels
belongs to the autoencoder that made the latent space.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from pretzel_jax.flow.latent_flow import LatentFlow, LatentFlowConfig

META = "latent_flow.json"
PARAMS = "params"


def save(directory: str | Path, model: LatentFlow, *, source: str = "") -> Path:
    """Writes the checkpoint; refuses a directory that already has one (no data is lost)."""
    directory = Path(directory).absolute()
    if (directory / META).exists() or (directory / PARAMS).exists():
        raise FileExistsError(
            f"{directory} already holds a latent-flow checkpoint; choose a new --out directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS, state)
    meta = {"config": model.config.to_dict(), "source": source}
    (directory / META).write_text(json.dumps(meta, indent=2))
    return directory


def load(directory: str | Path) -> LatentFlow:
    directory = Path(directory).absolute()
    if not (directory / META).exists():
        raise FileNotFoundError(
            f"{directory} is not a latent-flow checkpoint (no {META}); write one with "
            "`python -m pretzel_jax.convert.starflow` or `pretzel_jax.sample.latent_flow.save`"
        )
    config = LatentFlowConfig.from_dict(json.loads((directory / META).read_text())["config"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LatentFlow(config, rngs=nnx.Rngs(0))))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract.to_pure_dict())
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory / PARAMS, target)
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract)


@nnx.jit(static_argnames=("guided",))
def _sample(model, noise, context, guidance, *, guided: bool):
    uncond = jnp.zeros_like(context) if guided else None
    return model.sample(noise, context, guidance=guidance, uncond_context=uncond)


def sample(
    model: LatentFlow, key: jax.Array, num: int, context=None, *, guidance: float = 0.0
) -> jax.Array:
    """`num` latents (num, H, W, C) from N(0, I) noise; compiled once per shape."""
    if (context is None) != (model.config.flow.context_dim == 0):
        need = "needs" if model.config.flow.context_dim else "takes no"
        raise ValueError(f"this flow {need} a context (caption features)")
    noise = jax.random.normal(key, (num, *model.config.image_shape), jnp.float32)
    if context is not None:
        context = jnp.asarray(context, jnp.float32)
        if context.ndim == 2:
            context = context[None]
        if context.ndim != 3 or context.shape[0] not in (1, num):
            raise ValueError(
                f"context must be (L, dim), (1, L, dim) or ({num}, L, dim), got {context.shape}"
            )
        context = jnp.broadcast_to(context, (num, *context.shape[1:]))
    guided = context is not None and guidance != 0.0
    return _sample(model, noise, context, jnp.float32(guidance), guided=guided)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory")
    parser.add_argument("--out", required=True, help="output .npz (refuses to overwrite)")
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", help=".npy caption features (B, L, dim) or (L, dim)")
    parser.add_argument("--guidance", type=float, default=0.0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; choose another --out")
    model = load(args.ckpt)
    context = None if args.context is None else np.load(args.context, allow_pickle=False)
    x = sample(model, jax.random.key(args.seed), args.num, context, guidance=args.guidance)
    np.savez(out, latents=np.asarray(x))
    print(f"wrote {args.num} latents {tuple(x.shape[1:])} to {out}")


if __name__ == "__main__":
    main()
