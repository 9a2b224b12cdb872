"""Stage 0 (the toy VLM trained from scratch): the experiment's smoke size end to end through the
CLI with a resume and the report; the packed loss learns; packed documents, and the branches of one
document, do not see each other."""

import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pretzel_jax import models
from pretzel_jax.data import make_stage_iterator, prepare_dataset
from pretzel_jax.data.pipeline import make_layout
from pretzel_jax.data.schema import ROLE_ASSISTANT, ROLE_USER, Document, Segment
from pretzel_jax.train.__main__ import main
from pretzel_jax.train.config import load_config
from pretzel_jax.vlm import Qwen25VL, VisionConfig, VLMConfig, preprocess_images
from pretzel_jax.vlm.lm_loss import packed_embeds, patchify
from pretzel_jax.vlm.text import TextConfig, TextDecoder

EXPERIMENT = "experiments/shapes_stage0_vlm.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data"))
    for name in ("shapes_vqa_tiny", "shapes_captions_tiny"):
        prepare_dataset(name, path)
    return path


@pytest.fixture(scope="module")
def config(data_dir):
    return load_config(EXPERIMENT + ":test", overrides=[f"data.data_dir={data_dir}"])


def _train_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [r for r in rows if "loss" in r]


@pytest.mark.slow
def test_smoke_run_resumes_and_reports_every_field(data_dir, tmp_path):
    run = ["--config", EXPERIMENT + ":test", f"--config.data.data_dir={data_dir}"]
    run += ["--run_dir", str(tmp_path)]
    assert main(run) == 0  # 4 steps, checkpoints at 2 and 4
    first = _train_rows(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    assert main(run) == 0  # resumes from step 2, its log rows of steps 3-4 dropped
    # Each step logged once; the resumed run repeats steps 3-4 exactly.
    assert [r["step"] for r in first] == [2, 4]  # log_every=2
    assert [(r["step"], r["loss"]) for r in _train_rows(tmp_path)] == [
        (r["step"], r["loss"]) for r in first
    ]
    report = json.loads((tmp_path / "report.json").read_text())
    for prefix in ("", "heldout_"):
        keys = ["vqa_accuracy", "caption_exact_match"]
        keys += [f"vqa_accuracy_{t}" for t in ("color", "shape", "count", "position", "yes_no")]
        keys += [f"vqa_accuracy_objects_{n}" for n in (1, 2, 3)]
        for key in keys:
            assert prefix + key in report, prefix + key
        assert report[prefix + "vqa_questions"] == 6  # 2 records x 3 questions
        assert 0 <= report[prefix + "vqa_accuracy"] <= 1
    # The exported folder loads back as a Qwen25VL with the trained weights.
    from pretzel_jax.convert.hf_qwen25vl import load

    loaded = load(tmp_path / "hf")
    assert isinstance(loaded, Qwen25VL) and loaded.cfg.image_token_id == 5
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_packed_loss_decreases_on_a_fixed_batch(config):
    batch = next(make_stage_iterator(config.data, "train"))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    model = nnx.jit(lambda: models.build(config, rngs=nnx.Rngs(0)))()  # eager init is slower
    graphdef, params = nnx.split(model)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt):
        loss_fn = lambda p: nnx.merge(graphdef, p).loss(batch, None)[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, loss

    opt = tx.init(params)
    losses = []
    for _ in range(6):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


def test_segment_mask_blocks_attention_across_documents():
    cfg = TextConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        mrope_section=(2, 1, 1),
    )
    decoder = nnx.jit(lambda: TextDecoder(cfg, nnx.Rngs(0)))()
    x = jax.random.normal(jax.random.key(1), (1, 8, 16))
    x = jnp.concatenate([x, x.at[:, :3].add(1.0)])  # row 1: only document 1 changes
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]] * 2)
    positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0]] * 2)

    @nnx.jit
    def outputs(decoder, x):
        run = lambda s: decoder(x, positions, kv_mask=segments > 0, segment_ids=s)[0]
        return run(segments), run(None), decoder(x[:1, 3:7], positions[:1, 3:7])[0]

    packed, plain, alone = outputs(decoder, x)
    np.testing.assert_array_equal(packed[0, 3:7], packed[1, 3:7])  # document 2 is untouched
    assert not np.allclose(packed[0, :3], packed[1, :3])
    # Without the segment mask document 2 would see document 1.
    assert not np.allclose(plain[0, 3:7], plain[1, 3:7])
    # A packed document gives what it gives alone (its own positions from 0).
    np.testing.assert_allclose(packed[:1, 3:7], alone, atol=1e-5)


def test_a_branched_question_gives_what_it_gives_alone(config):
    """Each branch of a packed branched VQA document: the logits it has as its own document."""
    image = Segment.of_image(
        np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8), ROLE_USER
    )
    qa = [("what color is the circle ?", "red"), ("how many objects are there ?", "two")]
    qa.append(("is there a blue square ?", "no"))
    branches = tuple(
        (Segment.of_text(q, ROLE_USER), Segment.of_text(a, ROLE_ASSISTANT, True)) for q, a in qa
    )
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.seq_len = 128  # all three branches fit
    layout = make_layout(data_cfg)
    doc = Document("d", "vqa", (image,), branches=branches)
    packed = layout.pack([layout.document(doc)])
    assert set(packed["branch_ids"][0].tolist()) == {0, 1, 2, 3}
    model = nnx.jit(lambda: models.build(config, rngs=nnx.Rngs(0)))()

    @functools.partial(nnx.jit, static_argnames="branched")
    def logits(model, batch, branched: bool):
        embeds = packed_embeds(model, batch["tokens"], batch["images"])
        hidden, _ = model.forward(
            embeds,
            batch["positions"],
            kv_mask=batch["segment_ids"] > 0,
            segment_ids=batch["segment_ids"],
            branch_ids=batch["branch_ids"] if branched else None,
        )
        return model.logits(hidden)[0]

    both = {k: jnp.asarray(v) for k, v in packed.items()}
    branched, unbranched = logits(model, both, True), logits(model, both, False)
    real = packed["segment_ids"][0] > 0
    for k, branch in enumerate(branches, start=1):
        alone = layout.pack([layout.document(Document("d", "vqa", (image, *branch)))])
        want = logits(model, {key: jnp.asarray(v) for key, v in alone.items()}, True)
        view = np.flatnonzero(
            real & ((packed["branch_ids"][0] == 0) | (packed["branch_ids"][0] == k))
        )
        np.testing.assert_allclose(branched[view], want[: len(view)], atol=1e-5)
        if k > 1:  # without branch ids, a later question sees the earlier ones
            assert np.abs(unbranched[view] - want[: len(view)]).max() > 1e-2


def test_patchify_in_the_loss_equals_preprocess_images(config):
    vision = models.vlm_config(config.model).vision
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    want, grid = preprocess_images(
        list(images),
        min_pixels=16,
        max_pixels=32 * 32,
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    side = 32 // vision.patch_size
    assert grid.tolist() == [[1, side, side]] * 2
    merged = side // vision.spatial_merge_size
    assert (merged, merged) == tuple(config.data.latent_grid)  # the layout's tokens per image
    np.testing.assert_allclose(patchify(jnp.asarray(images), vision), want, atol=1e-6)


def test_image_features_land_on_their_own_rows_tokens():
    text = TextConfig(16, 16, 16, 1, 2, 1, mrope_section=(2, 1, 1))
    vision = VisionConfig(
        depth=1,
        hidden_size=8,
        intermediate_size=8,
        num_heads=2,
        patch_size=2,
        window_size=8,
        fullatt_block_indexes=(),
        out_hidden_size=16,
    )
    ids = dict(image_token_id=5, vision_start_token_id=3, vision_end_token_id=4)
    model = nnx.jit(lambda: Qwen25VL(VLMConfig(text, vision, **ids), nnx.Rngs(0)))()
    images = np.random.default_rng(1).integers(0, 256, (2, 1, 32, 32, 3), np.uint8)
    tokens = np.full((2, 70), 9, np.int32)
    tokens[:, 3 : 3 + 64] = 5
    pixels, grid = preprocess_images(
        list(images[:, 0]), min_pixels=16, max_pixels=1024, patch_size=2
    )

    @nnx.jit
    def both(model, tokens, images, pixels):
        return packed_embeds(model, tokens, images), model.vision(pixels, ((1, 16, 16),) * 2)

    embeds, feats = both(model, jnp.asarray(tokens), jnp.asarray(images), jnp.asarray(pixels))
    assert grid.tolist() == [[1, 16, 16]] * 2
    np.testing.assert_allclose(embeds[:, 3:67], feats.reshape(2, 64, -1), atol=1e-5)
    np.testing.assert_array_equal(embeds[:, :3], model.text.embed[...][tokens[:, :3]])


def test_data_that_disagrees_with_the_vision_tower_is_refused(data_dir):
    config = load_config(
        EXPERIMENT + ":test",
        overrides=[f"data.data_dir={data_dir}", "data.spatial_merge_size=1"],
    )
    with pytest.raises(ValueError, match=r"set data.spatial_merge_size=2 and data.image_size"):
        models.build(config, rngs=nnx.Rngs(0))
