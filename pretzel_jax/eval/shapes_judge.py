"""GenEval-style judge for the synthetic shapes family.

A small CNN parses an image into its objects and a prompt is checked against the parsed scene with
the grammar's own `PromptSpec.satisfied_by`, the check GenEval applies to detector output: each
object query matched (exactly `count` times for numerals), colours, and relations between cells.

Why one classifier per grid cell: the scene convention puts at most one object per cell, wholly
inside it, so the image is resized to 3k x 3k pixels, cut into its nine k x k cells, and one shared
network reads each cell (presence, shape, colour, size; plus a background vote). That sees nine
examples per image and cannot confuse positions, so well under a minute of CPU training reaches
>99% per attribute. Training degrades renders the way a toy generator does (Gaussian blur and
pixel noise of random strength, small colour drift) so the judge stays accurate on samples.

    judge = load()                       # trains and caches the weights on first use
    judge.parse(images)                  # uint8 (B, H, W, 3) -> list of SceneSpec
    judge.score(images, prompts)         # -> {"single_object": .., ..., "overall": ..}

Train / evaluate from the command line:

    python -m pretzel_jax.eval.shapes_judge --train [--out DIR] [--steps N] [--seed S]
    python -m pretzel_jax.eval.shapes_judge --eval [--path DIR] [--n N]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from pretzel_jax.data.shapes.grammar import (
    GENEVAL_CATEGORIES,
    PromptSpec,
    geneval_prompts,
    parse_caption,
    scene_for_prompt,
)
from pretzel_jax.data.shapes.render import CELL_MARGIN, STRIPE_PERIOD, SUPERSAMPLE, render
from pretzel_jax.data.shapes.scene import (
    BACKGROUNDS,
    COLORS,
    COLS,
    MAX_OBJECTS,
    ROWS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    random_heldout_scene,
    random_scene,
)

WEIGHTS_FILE = "judge.safetensors"
META_FILE = "judge.json"
FORMAT = "pretzel_jax.shapes_judge/1"
# Bump when the training recipe changes in a way that should invalidate cached weights.
RECIPE_VERSION = 2
NUM_CELLS = len(ROWS) * len(COLS)
TRAIN_COMMAND = "python -m pretzel_jax.eval.shapes_judge --train"


class JudgeWeightsError(RuntimeError):
    """Cached judge weights that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Architecture and training recipe (saved with the weights)."""

    cell_pixels: int = 12  # images are resized to 3*cell_pixels square, then cut into 9 cells
    channels: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    train_size: int = 32  # render size of the training images (the toy model's image size)
    # Small batches, many steps: at a fixed compute budget this beat batch 64 and 128.
    batch: int = 32
    pool: int = 4096  # training renders, reused under fresh augmentation
    cells_per_batch: int = 80  # every occupied cell first, then random empty ones (easy ones)
    small_fraction: float = 0.75  # of training objects; small shapes are the hard ones
    steps: int = 800
    learning_rate: float = 6e-3
    warmup_steps: int = 30
    max_blur: float = 1.75  # Gaussian blur sigma, pixels at train_size, drawn in [0, max]
    max_noise: float = 0.2  # Gaussian pixel noise std, in units of the full [0, 1] range
    max_color_drift: float = 0.04  # per-channel gain and offset drift
    clean_fraction: float = 0.25  # chance each degradation is off for an image

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if not 0 < self.cells_per_batch <= self.batch * NUM_CELLS:
            raise ValueError(
                f"cells_per_batch={self.cells_per_batch} must be in 1..batch*9 "
                f"({self.batch * NUM_CELLS})"
            )


def vocabulary() -> dict[str, list[str]]:
    return {
        "shape": list(SHAPES),
        "color": list(COLORS),
        "size": list(SIZES),
        "background": list(BACKGROUNDS),
    }


def data_version() -> str:
    """Hash of everything in the renderer the judge's weights depend on: a cached judge trained on
    different renders (a new colour, another object size, ...) is refused rather than misused."""
    facts = {
        "vocabulary": vocabulary(),
        "colors": COLORS,
        "sizes": SIZES,
        "backgrounds": BACKGROUNDS,
        "grid": [ROWS, COLS],
        "render": [SUPERSAMPLE, CELL_MARGIN, STRIPE_PERIOD],
        "recipe": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


# ---- Model -----------------------------------------------------------------------------------


class CellClassifier(nnx.Module):
    """Reads one grid cell: presence logit and shape / colour / size / background logits."""

    def __init__(self, config: JudgeConfig, rngs: nnx.Rngs):
        c1, c2, c3 = config.channels
        self.conv1 = nnx.Conv(3, c1, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(c2, c3, (3, 3), rngs=rngs)
        side = -(-config.cell_pixels // 4)
        self.hidden = nnx.Linear(side * side * c3, config.hidden, rngs=rngs)
        self.sizes = {k: len(v) for k, v in vocabulary().items()}
        self.head = nnx.Linear(config.hidden, 1 + sum(self.sizes.values()), rngs=rngs)

    def __call__(self, cells: jax.Array) -> dict[str, jax.Array]:
        x = cells - 0.5
        # Full resolution until two layers have seen the edges: small objects are ~6 px wide.
        x = jax.nn.relu(self.conv1(x))
        x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
        x = nnx.max_pool(jax.nn.relu(self.conv3(x)), (2, 2), (2, 2))
        x = jax.nn.relu(self.hidden(x.reshape(*x.shape[:-3], -1)))
        out = self.head(x)
        logits = {"present": out[..., 0]}
        start = 1
        for name, n in self.sizes.items():
            logits[name] = out[..., start : start + n]
            start += n
        return logits


def to_cells(images: jax.Array, cell_pixels: int) -> jax.Array:
    """float (B, H, W, 3) in [0, 1] -> (B, 9, k, k, 3), cells in reading order (row, then col)."""
    b = images.shape[0]
    side = 3 * cell_pixels
    if images.shape[1:3] != (side, side):
        images = jax.image.resize(images, (b, side, side, 3), "linear")
    x = images.reshape(b, 3, cell_pixels, 3, cell_pixels, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, NUM_CELLS, cell_pixels, cell_pixels, 3)


# ---- Degradations (training augmentation and the robustness curve) ---------------------------

BLUR_RADIUS = 5  # taps each side; exact enough for sigma <= 2.5


def gaussian_blur(images: jax.Array, sigma: jax.Array) -> jax.Array:
    """Separable Gaussian blur with a per-image sigma (B,) in pixels; sigma 0 leaves it as is."""
    taps = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    s = jnp.maximum(sigma, 1e-3)[:, None]
    w = jnp.exp(-0.5 * jnp.square(taps[None, :] / s))
    w = w / w.sum(-1, keepdims=True)  # (B, taps)
    r = BLUR_RADIUS
    h, wd = images.shape[1:3]
    x = jnp.pad(images, ((0, 0), (r, r), (0, 0), (0, 0)), mode="edge")
    x = sum(w[:, i, None, None, None] * x[:, i : i + h] for i in range(2 * r + 1))
    x = jnp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="edge")
    return sum(w[:, i, None, None, None] * x[:, :, i : i + wd] for i in range(2 * r + 1))


def quantize(images: jax.Array) -> jax.Array:
    """What a generator's output looks like after conversion to uint8."""
    return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0) / 255.0


def degrade(
    images: np.ndarray, *, noise_std: float = 0.0, blur_sigma: float = 0.0, seed: int = 0
) -> np.ndarray:
    """uint8 images blurred (sigma in pixels) then noised (std in units of [0, 1]), as uint8."""
    x = jnp.asarray(images)
    return np.asarray(_degrade(x, jnp.float32(noise_std), jnp.float32(blur_sigma), seed))


@jax.jit
def _degrade(images: jax.Array, noise_std: jax.Array, blur_sigma: jax.Array, seed) -> jax.Array:
    x = images.astype(jnp.float32) / 255.0
    x = gaussian_blur(x, jnp.full((x.shape[0],), blur_sigma))
    x = x + noise_std * jax.random.normal(jax.random.key(seed), x.shape)
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def augment(key: jax.Array, images: jax.Array, config: JudgeConfig) -> jax.Array:
    """Random blur, noise and colour drift per image (each off with prob `clean_fraction`)."""
    b = images.shape[0]
    k_blur, k_noise, k_on, k_eps, k_gain, k_off = jax.random.split(key, 6)
    on = jax.random.uniform(k_on, (2, b)) >= config.clean_fraction
    sigma = jax.random.uniform(k_blur, (b,), maxval=config.max_blur) * on[0]
    std = jax.random.uniform(k_noise, (b,), maxval=config.max_noise) * on[1]
    x = gaussian_blur(images, sigma)
    d = config.max_color_drift
    gain = 1.0 + jax.random.uniform(k_gain, (b, 1, 1, 3), minval=-d, maxval=d)
    offset = jax.random.uniform(k_off, (b, 1, 1, 3), minval=-d, maxval=d)
    x = x * gain + offset + std[:, None, None, None] * jax.random.normal(k_eps, x.shape)
    return quantize(x)


# ---- Training --------------------------------------------------------------------------------


def _all_combos(shape: str, color: str) -> bool:
    # The judge trains on every (shape, colour) pair: it must read heldout-split samples too.
    return True


def scene_labels(scenes: Sequence[SceneSpec]) -> dict[str, np.ndarray]:
    """Per-cell targets (B, 9) (attribute index 0 where a cell is empty) and background (B,)."""
    vocab = vocabulary()
    names = ("present", "shape", "color", "size")
    labels = {name: np.zeros((len(scenes), NUM_CELLS), np.int32) for name in names}
    labels["background"] = np.array([vocab["background"].index(s.background) for s in scenes])
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            cell = o.cell[0] * len(COLS) + o.cell[1]
            labels["present"][i, cell] = 1
            for name in ("shape", "color", "size"):
                labels[name][i, cell] = vocab[name].index(getattr(o, name))
    return labels


def render_batch(
    rng: np.random.Generator, n: int, size: int, heldout: bool = False
) -> tuple[np.ndarray, list[SceneSpec]]:
    """`n` random scenes (every (shape, colour) pair, or heldout-split scenes) and their renders."""
    if heldout:
        scenes = [random_heldout_scene(rng) for _ in range(n)]
    else:
        scenes = [random_scene(rng, allowed=_all_combos) for _ in range(n)]
    return np.stack([render(s, size, rng) for s in scenes]), scenes


def _training_pool(rng: np.random.Generator, config: JudgeConfig) -> dict[str, np.ndarray]:
    """Renders to draw training batches from. Rendering (~1 ms an image) would cost as much as
    the training steps, so a pool is rendered once and reused under fresh augmentation."""
    scenes = []
    for _ in range(config.pool):
        scene = random_scene(rng, allowed=_all_combos)
        objects = tuple(
            o.replace(size="small" if rng.random() < config.small_fraction else "large")
            for o in scene.objects
        )
        scenes.append(SceneSpec(objects, scene.background))
    images = np.stack([render(s, config.train_size, rng) for s in scenes])
    return scene_labels(scenes) | {"images": images}


def _training_batch(
    rng: np.random.Generator, pool: dict[str, np.ndarray], config: JudgeConfig
) -> dict[str, np.ndarray]:
    pick = rng.integers(len(pool["images"]), size=config.batch)
    batch = {k: v[pick] for k, v in pool.items()}
    # The cells to train on, as indices into the batch's B*9 cells: occupied ones first.
    priority = batch["present"].reshape(-1) + rng.random(config.batch * NUM_CELLS)
    batch["cells"] = np.argsort(-priority)[: config.cells_per_batch].astype(np.int32)
    return batch


def _loss(model: CellClassifier, batch: dict[str, jax.Array], key: jax.Array, config: JudgeConfig):
    images = augment(key, batch["images"].astype(jnp.float32) / 255.0, config)
    cells = to_cells(images, config.cell_pixels)
    idx = batch["cells"]
    picked = cells.reshape(-1, *cells.shape[2:])[idx]
    # Every shape is mirror symmetric left-right: flipping a cell is a free new example.
    flip = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, idx.shape)[:, None, None, None]
    logits = model(jnp.where(flip, picked[:, :, ::-1], picked))
    target = {k: batch[k].reshape(-1)[idx] for k in ("present", "shape", "color", "size")}
    target["background"] = jnp.repeat(batch["background"], NUM_CELLS)[idx]
    present = target["present"].astype(jnp.float32)
    losses = {"present": optax.sigmoid_binary_cross_entropy(logits["present"], present).mean()}
    for name in ("shape", "color", "size"):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[name], target[name])
        losses[name] = (ce * present).sum() / jnp.maximum(present.sum(), 1.0)
    # Each cell votes on the background (`parse` averages the nine votes).
    ce = optax.softmax_cross_entropy_with_integer_labels(logits["background"], target["background"])
    losses["background"] = ce.mean()
    return sum(losses.values()), losses


def _optimizer(config: JudgeConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1)
    )
    return optax.adam(schedule)


def train(config: JudgeConfig | None = None, *, seed: int = 0, log_every: int = 0) -> Judge:
    """A judge trained from scratch on random renders (deterministic given `seed`)."""
    config = config or JudgeConfig()
    start = time.perf_counter()
    model = CellClassifier(config, nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = _optimizer(config)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        def loss_fn(p):
            return _loss(nnx.merge(graphdef, p), batch, key, config)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    rng = np.random.default_rng([seed, 1])
    pool = _training_pool(rng, config)
    key = jax.random.key(seed)
    for i in range(config.steps):
        batch = _training_batch(rng, pool, config)
        params, opt_state, parts = step(params, opt_state, batch, jax.random.fold_in(key, i))
        if log_every and (i + 1) % log_every == 0:
            text = " ".join(f"{k} {float(v):.4f}" for k, v in parts.items())
            print(f"step {i + 1}/{config.steps}: {text}", flush=True)
    params = jax.block_until_ready(params)
    return Judge(
        config, params, {"seed": seed, "train_seconds": round(time.perf_counter() - start, 1)}
    )


# ---- The judge -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParsedScene(SceneSpec):
    """A scene as the judge reads it when it shows more objects than a `SceneSpec` may hold (a
    generated image can): counting prompts must see every object. Otherwise `parse` returns plain
    `SceneSpec`s."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.cell)))


def _scene(objects: list[ObjectSpec], background: str) -> SceneSpec:
    cls = SceneSpec if len(objects) <= MAX_OBJECTS else ParsedScene
    return cls(tuple(objects), background)


def _as_prompt(p) -> PromptSpec:
    if isinstance(p, PromptSpec):
        return p
    if isinstance(p, str):
        return parse_caption(p)
    if isinstance(getattr(p, "spec", None), PromptSpec):  # grammar.Prompt
        return p.spec
    raise TypeError(f"Expected a prompt string, PromptSpec or grammar Prompt; got {p!r}.")


class Judge:
    """A trained cell classifier: `parse`, `check` and `score` images (uint8 (B, H, W, 3))."""

    chunk = 256  # images per jitted call (padded), so any batch size compiles once per H, W

    def __init__(self, config: JudgeConfig, params: nnx.State, meta: dict | None = None):
        self.config = config
        self.params = params
        self.meta = dict(meta or {})
        self._graphdef = nnx.graphdef(nnx.eval_shape(lambda: CellClassifier(config, nnx.Rngs(0))))
        self._predict = jax.jit(self._predict_chunk)

    def _predict_chunk(self, params, images):
        model = nnx.merge(self._graphdef, params)
        cells = to_cells(images.astype(jnp.float32) / 255.0, self.config.cell_pixels)
        # Every shape is mirror symmetric: averaging a cell's logits with its mirror image's
        # cancels some of the noise (+0.5 points of shape accuracy under blur + noise).
        plain, mirrored = model(cells), model(cells[..., ::-1, :])
        logits = {k: (plain[k] + mirrored[k]) / 2 for k in plain}
        out = {"present": jax.nn.sigmoid(logits["present"])}
        out |= {k: jnp.argmax(logits[k], -1) for k in ("shape", "color", "size")}
        out["background"] = jnp.argmax(logits["background"].mean(1), -1)
        return out

    def predict(self, images) -> dict[str, np.ndarray]:
        """Raw per-cell predictions: presence probability (B, 9), attribute indices (B, 9) into
        `vocabulary()`, background index (B,)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"The judge reads uint8 images of shape (B, H, W, 3); got {images.dtype} "
                f"{images.shape} (add a batch axis with images[None] for one image)"
            )
        parts = []
        for s in range(0, len(images), self.chunk):
            chunk = images[s : s + self.chunk]
            # Pad to 64, 128 or 256 images: few distinct shapes, so few compilations.
            pad = min(self.chunk, max(64, 1 << (len(chunk) - 1).bit_length())) - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
            out = jax.device_get(self._predict(self.params, chunk))
            parts.append({k: v[: len(chunk) - pad] for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def parse(self, images) -> list[SceneSpec]:
        """The scene each image shows (objects where presence > 0.5, attributes by argmax)."""
        pred = self.predict(images)
        vocab = vocabulary()
        scenes = []
        for i in range(len(pred["present"])):
            objects = [
                ObjectSpec(
                    vocab["shape"][pred["shape"][i, c]],
                    vocab["color"][pred["color"][i, c]],
                    vocab["size"][pred["size"][i, c]],
                    ROWS[c // len(COLS)],
                    COLS[c % len(COLS)],
                )
                for c in range(NUM_CELLS)
                if pred["present"][i, c] > 0.5
            ]
            scenes.append(_scene(objects, vocab["background"][pred["background"][i]]))
        return scenes

    def check(self, images, prompts: Sequence) -> np.ndarray:
        """Whether each image satisfies its prompt (a caption, `PromptSpec` or grammar `Prompt`)."""
        specs = [_as_prompt(p) for p in prompts]
        if len(specs) != len(images):
            raise ValueError(f"{len(images)} images but {len(specs)} prompts; give one per image")
        return np.array([p.satisfied_by(s) for p, s in zip(specs, self.parse(images), strict=True)])

    def score(self, images, prompts: Sequence) -> dict[str, float]:
        """GenEval scores: the fraction of images satisfying their prompt per category present
        (GenEval's six), "other" for captions outside them (sizes, grid cells), and "overall", the
        mean over the GenEval categories present (as GenEval averages its tasks)."""
        specs = [_as_prompt(p) for p in prompts]
        correct = self.check(images, specs)
        groups: dict[str, list[bool]] = {}
        for spec, ok in zip(specs, correct, strict=True):
            groups.setdefault(spec.category or "other", []).append(bool(ok))
        names = [c for c in (*GENEVAL_CATEGORIES, "other") if c in groups]
        scores = {c: float(np.mean(groups[c])) for c in names}
        geneval = [scores[c] for c in GENEVAL_CATEGORIES if c in scores]
        scores["overall"] = float(np.mean(geneval)) if geneval else float("nan")
        return scores

    # ---- Saving --------------------------------------------------------------------------

    def flat_params(self) -> dict[str, np.ndarray]:
        flat = nnx.to_flat_state(self.params)
        return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in flat}

    def save(self, path: str | Path) -> Path:
        """Write `judge.safetensors` and `judge.json` (config, seed, data version, checksum)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / WEIGHTS_FILE
        _atomic_write(weights, lambda f: save_file(self.flat_params(), f))
        meta = {
            "format": FORMAT,
            "data_version": data_version(),
            "config": dataclasses.asdict(self.config),
            "vocabulary": vocabulary(),
            "weights_sha256": _sha256(weights),
            **self.meta,
        }
        _atomic_write(folder / META_FILE, lambda f: Path(f).write_text(json.dumps(meta, indent=2)))
        return folder


def _atomic_write(target: Path, write) -> None:
    """Write via a temporary file and rename, so a concurrent reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_dir() -> Path:
    """`$PRETZEL_CACHE/shapes_judge`, else `~/.cache/pretzel_jax/shapes_judge`."""
    root = os.environ.get("PRETZEL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "pretzel_jax"
    return base / "shapes_judge"


def _unusable(folder: Path, file: Path, why: str) -> JudgeWeightsError:
    return JudgeWeightsError(
        f"Shapes judge weights {file} {why}. Delete {folder} and retrain with "
        f"`{TRAIN_COMMAND} --out {folder}` (or call load({str(folder)!r}) after deleting it)."
    )


def read(path: str | Path) -> Judge:
    """The judge saved in folder `path`; `JudgeWeightsError` naming the file if it is unusable."""
    folder = Path(path)
    weights, meta_file = folder / WEIGHTS_FILE, folder / META_FILE
    for f in (meta_file, weights):
        if not f.is_file():
            raise _unusable(folder, f, "are missing" if f == weights else "has no metadata file")
    try:
        meta = json.loads(meta_file.read_text())
        version = meta.get("data_version")
    except (json.JSONDecodeError, AttributeError) as e:
        raise _unusable(folder, meta_file, f"is not a valid judge metadata file ({e})") from None
    if meta.get("format") != FORMAT:
        raise _unusable(folder, meta_file, f"has format {meta.get('format')!r}, not {FORMAT!r}")
    if version != data_version():
        raise _unusable(
            folder,
            weights,
            f"are of data version {version}, but this code's renderer and training recipe are "
            f"version {data_version()} (the vocabulary, drawing or recipe changed)",
        )
    try:
        config = JudgeConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise _unusable(folder, meta_file, f"is not a valid judge metadata file ({e})") from None
    if _sha256(weights) != meta.get("weights_sha256"):
        raise _unusable(folder, weights, f"do not match the checksum in {meta_file.name}")
    abstract = nnx.state(nnx.eval_shape(lambda: CellClassifier(config, nnx.Rngs(0))), nnx.Param)
    try:
        with safe_open(str(weights), framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise _unusable(folder, weights, f"are not a readable safetensors file ({e})") from None
    flat = nnx.to_flat_state(abstract)
    names = [".".join(map(str, path)) for path, _ in flat]
    if sorted(names) != sorted(arrays):
        raise _unusable(folder, weights, f"hold tensors {sorted(arrays)}, expected {sorted(names)}")
    leaves = []
    for name, (path, var) in zip(names, flat, strict=True):
        if arrays[name].shape != var.get_value().shape:
            raise _unusable(
                folder,
                weights,
                f"hold {name} of shape {arrays[name].shape}, expected {var.get_value().shape}",
            )
        leaves.append((path, var.replace(jnp.asarray(arrays[name]))))
    params = nnx.from_flat_state(leaves)
    keep = ("seed", "train_seconds")
    return Judge(config, params, {k: meta[k] for k in keep if k in meta})


def load(path: str | Path | None = None, *, train_if_missing: bool = True) -> Judge:
    """The cached judge in `path` (default `default_dir()`), trained and saved there first when
    the folder holds no weights and `train_if_missing`. Unusable weights raise
    `JudgeWeightsError` naming the file and the fix (they are never silently replaced)."""
    folder = Path(path) if path is not None else default_dir()
    if not (folder / WEIGHTS_FILE).exists() and not (folder / META_FILE).exists():
        if not train_if_missing:
            raise JudgeWeightsError(
                f"No shapes judge weights in {folder}; train them with "
                f"`{TRAIN_COMMAND} --out {folder}` or call load(train_if_missing=True)."
            )
        judge = train()
        judge.save(folder)
    return read(folder)


# ---- Evaluation ------------------------------------------------------------------------------


def attribute_accuracy(judge: Judge, images: np.ndarray, scenes: Sequence[SceneSpec]) -> dict:
    """Per-attribute accuracy of `judge` on images of known scenes.

    presence: cells classified occupied/empty correctly; count: images with the right number of
    objects; position: true objects detected in their own cell; shape/color/size: true objects
    whose attribute is read right at their cell; scene: images parsed exactly; background."""
    pred = judge.predict(images)
    truth = scene_labels(scenes)
    present = truth["present"].astype(bool)
    found = pred["present"] > 0.5
    acc = {
        "presence": (found == present).mean(),
        "count": (found.sum(1) == present.sum(1)).mean(),
        "position": found[present].mean(),
    }
    for name in ("shape", "color", "size"):
        acc[name] = (pred[name] == truth[name])[present].mean()
    right = (found == present) & ((pred["shape"] == truth["shape"]) | ~present)
    for name in ("color", "size"):
        right &= (pred[name] == truth[name]) | ~present
    acc["scene"] = right.all(1).mean()
    acc["background"] = (pred["background"] == truth["background"]).mean()
    return {k: float(v) for k, v in acc.items()}


EVAL_SEED = 20_240_917  # held-out renders: a seed no training run uses (training uses [seed, 1])
NOISE_CURVE = (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2)
BLUR_CURVE = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
# The harshest degradation we expect of a toy generator's 32 px samples, where the >95% target is
# checked: blur of about one pixel (decoding an 8x8 latent grid) plus visible pixel noise.
TOY_NOISE, TOY_BLUR = 0.1, 1.0


ACCURACY_KEYS = ("presence", "count", "position", "shape", "color", "size", "scene", "background")


def evaluate(judge: Judge, n: int = 1000, size: int = 32) -> dict[str, dict[str, float]]:
    """Print (and return) per-attribute accuracy on held-out renders, clean and along the noise /
    blur curves, then GenEval scores of renders of GenEval prompts (fixed seeds throughout)."""
    rng = np.random.default_rng([EVAL_SEED, size])
    images, scenes = render_batch(rng, n, size)
    rows = {f"clean test renders {size}px": attribute_accuracy(judge, images, scenes)}
    rows["clean heldout-combo split"] = attribute_accuracy(
        judge, *render_batch(rng, n, size, heldout=True)
    )
    if size == 32:
        big = render_batch(np.random.default_rng([EVAL_SEED, 64]), n, 64)
        rows["clean renders 64px"] = attribute_accuracy(judge, *big)
    curve = [(std, 0.0) for std in NOISE_CURVE[1:]] + [(0.0, sigma) for sigma in BLUR_CURVE[1:]]
    curve += [(0.05, 0.75), (0.05, 1.0), (TOY_NOISE, TOY_BLUR)]
    for std, sigma in curve:
        name = " + ".join(
            ([f"blur sigma {sigma:.2f}px"] if sigma else [])
            + ([f"noise std {std:.3f} ({255 * std:.0f}/255)"] if std else [])
        )
        noisy = degrade(images, noise_std=std, blur_sigma=sigma, seed=len(rows))
        rows[name] = attribute_accuracy(judge, noisy, scenes)
    width = max(map(len, rows)) + 2
    print(f"{f'accuracy % ({n} images)':<{width}}" + "".join(f"{k:>11}" for k in ACCURACY_KEYS))
    for name, acc in rows.items():
        print(f"{name:<{width}}" + "".join(f"{100 * acc[k]:>11.2f}" for k in ACCURACY_KEYS))

    prompts = geneval_prompts(rng, max(n // len(GENEVAL_CATEGORIES), 1))
    renders = np.stack([render(scene_for_prompt(rng, p.spec), size, rng) for p in prompts])
    toy = degrade(renders, noise_std=TOY_NOISE, blur_sigma=TOY_BLUR, seed=0)
    scores = {"clean": judge.score(renders, prompts), "toy degraded": judge.score(toy, prompts)}
    col = max(map(len, scores["clean"])) + 2
    print(f"\n{f'GenEval score % ({len(prompts)} prompts)':<{width}}", end="")
    print("".join(f"{k:>{col}}" for k in scores["clean"]))
    for name, row in scores.items():
        print(f"{name:<{width}}" + "".join(f"{100 * v:>{col}.2f}" for v in row.values()))
    return rows | {f"geneval {k}": v for k, v in scores.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train the judge and save it")
    mode.add_argument("--eval", action="store_true", help="print accuracy and robustness curves")
    parser.add_argument("--out", "--path", dest="path", help=f"weights folder ({default_dir()})")
    parser.add_argument("--steps", type=int, default=JudgeConfig.steps, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--n", type=int, default=1000, help="held-out images per eval row")
    args = parser.parse_args(argv)
    folder = Path(args.path) if args.path else default_dir()
    if args.train:
        judge = train(JudgeConfig(steps=args.steps), seed=args.seed, log_every=100)
        judge.save(folder)
        print(f"trained in {judge.meta['train_seconds']} s; saved to {folder}")
    else:
        evaluate(load(folder, train_if_missing=False), n=args.n)


if __name__ == "__main__":
    main()
