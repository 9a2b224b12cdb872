"""A tiny Pretzel (2 x 32 VLM, flow width 32 with one shallow block) and packed rows from the
real layout, for the Pretzel tests."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from pretzel_jax.data import tokenizer as wt
from pretzel_jax.data.layout import Layout, LayoutConfig
from pretzel_jax.data.schema import ROLE_ASSISTANT, ROLE_USER, Document, Segment
from pretzel_jax.flow import FlowConfig
from pretzel_jax.pretzel import Pretzel, PretzelConfig
from pretzel_jax.vlm import TextConfig, VLMConfig

WORDS = ["a", "red", "blue", "circle", "square", "two", "left", "of", "yes", "no", "?", "."]
GRID = (2, 4)
CHANNELS = 4


def tokenizer(tmp_path):
    wt.build_word_tokenizer(WORDS, tmp_path)
    return wt.load_word_tokenizer(tmp_path)


def layout(
    tok, seq_len: int = 48, max_images: int = 2, image_size=(4, 4), vlm_grid_stride: int = 1
) -> Layout:
    cfg = LayoutConfig(
        seq_len=seq_len,
        latent_grid=GRID,
        image_size=image_size,
        max_images=max_images,
        vlm_grid_stride=vlm_grid_stride,
    )
    return Layout(tok, cfg)


def config(tok, *, stage: int = 3, taps=(-1,), layers=(1, 2), **kw) -> PretzelConfig:
    text = TextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        mrope_section=(2, 3, 3),
        rope_theta=10_000.0,
        tie_word_embeddings=True,
    )
    ids = {n: tok.token_to_id(t) for n, t in IDS.items()}
    vlm = VLMConfig(text=text, vision=None, bos_token_id=None, eos_token_id=None, **ids)
    flow = FlowConfig(
        token_dim=CHANNELS,
        width=32,
        head_dim=16,
        layers_per_block=layers,
        context_dim=32,
        rope="sectioned",
        rope_sections=(2, 3, 3),
    )
    return PretzelConfig(vlm=vlm, flow=flow, latent_grid=GRID, stage=stage, vlm_taps=taps, **kw)


IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


class ToyFAE(nnx.Module):
    """A stand-in FAE for 4x4 images and (2, 4, 4) latents: two linear maps."""

    def __init__(self, rngs: nnx.Rngs, size: tuple[int, int] = (4, 4)):
        n = GRID[0] * GRID[1] * CHANNELS
        self.size = size
        self.enc = nnx.Linear(size[0] * size[1] * 3, n, rngs=rngs)
        self.dec = nnx.Linear(n, size[0] * size[1] * 3, rngs=rngs)

    def encode(self, images):
        x = images.reshape(images.shape[0], -1).astype(jax.numpy.float32) / 255.0
        return self.enc(x).reshape(images.shape[0], *GRID, CHANNELS)

    def decode(self, latents):
        out = self.dec(latents.reshape(latents.shape[0], -1))
        return jax.nn.sigmoid(out).reshape(latents.shape[0], *self.size, 3)


def model(
    cfg: PretzelConfig,
    seed: int = 0,
    randomize_zero_init: bool = False,
    fae: bool = True,
    image_size: tuple[int, int] = (4, 4),
) -> Pretzel:
    toy = ToyFAE(nnx.Rngs(seed + 100), image_size) if fae else None
    m = Pretzel(cfg, fae=toy, rngs=nnx.Rngs(seed))
    if randomize_zero_init:  # switch the coupling on: W_vlm, W_D, A's last layer, flow heads
        key = jax.random.key(seed + 1)
        state = nnx.state(m, nnx.Param)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(key, len(leaves))
        leaves = [v + 0.05 * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)]
        nnx.update(m, jax.tree.unflatten(treedef, leaves))
    return m


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)


def t2i_doc(i: int = 0, caption: str = "a red circle") -> Document:
    return Document(
        f"t2i:{i}", "caption", (Segment.of_text(caption), Segment.of_image(image(i), target=True))
    )


def vqa_doc(i: int = 0) -> Document:
    return Document(
        f"vqa:{i}",
        "vqa",
        (
            Segment.of_image(image(i), role=ROLE_USER),
            Segment.of_text("two circle ?", role=ROLE_USER),
            Segment.of_text("yes", role=ROLE_ASSISTANT, target=True),
        ),
    )


def interleaved_doc(i: int = 0) -> Document:
    """Text, an image, text between, a second image, text after: both images targets."""
    return Document(
        f"il:{i}",
        "interleaved",
        (
            Segment.of_text("a red circle"),
            Segment.of_image(image(i), target=True),
            Segment.of_text("left of a blue square", target=True),
            Segment.of_image(image(i + 1), target=True),
            Segment.of_text("two .", target=True),
        ),
    )


def text_doc(i: int = 0) -> Document:
    return Document(f"txt:{i}", "text", (Segment.of_text("a blue square left of a red circle"),))


def batch(lay: Layout, rows: list[list[Document]], seed: int = 0) -> dict:
    """Each row packed from its documents (must fit one sequence), plus random latents."""
    packed = []
    for docs in rows:
        p = lay.pack([lay.document(d) for d in docs])
        assert p["tokens"].shape[0] == 1, "the documents of a row must fit one sequence"
        packed.append(p)
    out = {k: np.concatenate([p[k] for p in packed]) for k in packed[0]}
    b, n = out["images"].shape[:2]
    rng = np.random.default_rng(seed)
    out["latents"] = rng.normal(size=(b, n, GRID[0] * GRID[1], CHANNELS)).astype(np.float32)
    return out


def replace(cfg: PretzelConfig, **kw) -> PretzelConfig:
    return dataclasses.replace(cfg, **kw)
