"""Stage 0, step 1 (experiments/shapes_stage0_tower.py): the cells view labels what the record's
scene holds, the smoke size trains, resumes exactly and reports, and its tower.safetensors starts
the stage-0 VLM's tower (or fails clearly)."""

import json
import shutil

import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from pretzel_jax import models
from pretzel_jax.data import make_iterator, prepare_dataset
from pretzel_jax.data.shapes.scene import ObjectSpec, SceneSpec, cell_labels
from pretzel_jax.nn.param_file import flat_params
from pretzel_jax.train.__main__ import main
from pretzel_jax.train.config import load_config
from pretzel_jax.train.errors import ConfigError

TOWER = "experiments/shapes_stage0_tower.py:test"
VLM = "experiments/shapes_stage0_vlm.py:test"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data"))
    for name in ("shapes_cells_tiny", "shapes_vqa_tiny", "shapes_captions_tiny"):
        prepare_dataset(name, path)
    return path


def test_cell_labels_name_each_cells_object():
    scene = SceneSpec(
        (
            ObjectSpec("triangle", "blue", "large", "top", "right"),
            ObjectSpec("circle", "red", "small", "bottom", "left"),
        )
    )
    labels = cell_labels(scene)
    want = np.full((9, 3), -1)
    want[:, 0] = 0
    want[2] = (3, 2, 1)  # triangle = SHAPES[2] + 1, blue = COLORS[2], large = SIZES[1]
    want[6] = (1, 0, 0)  # circle, red, small
    np.testing.assert_array_equal(labels, want)


def test_cells_view_matches_the_caption_records(data_dir):
    cfg = ml_collections.ConfigDict(
        dict(
            data_dir=data_dir,
            batch_size=4,
            num_workers=0,
            seed=0,
            shuffle=False,
            drop_remainder=True,
        )
    )
    cells = next(make_iterator(_named(cfg, "shapes_cells_tiny"), "test"))
    images = next(make_iterator(_named(cfg, "shapes_images_tiny"), "test"))
    np.testing.assert_array_equal(cells["image"], images["image"])
    assert cells["cells"].shape == (4, 9, 3) and cells["cells"].dtype == np.int32
    # Each image's non-empty cells are its scene's objects: 1..3 per image.
    occupied = (cells["cells"][..., 0] > 0).sum(1)
    assert ((occupied >= 1) & (occupied <= 3)).all()
    empty = cells["cells"][..., 0] == 0
    assert (cells["cells"][..., 1:][empty] == -1).all()


def _named(cfg, name):
    out = cfg.copy_and_resolve_references()
    out.name = name
    return out


def _train_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [r for r in rows if "loss" in r]


@pytest.mark.slow
def test_smoke_run_resumes_reports_and_starts_the_vlm(data_dir, tmp_path):
    run = ["--config", TOWER, f"--config.data.data_dir={data_dir}", "--run_dir", str(tmp_path)]
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
        keys = [f"{kind}_accuracy_{i}" for kind in ("cell", "token_cell") for i in range(3)]
        for key in (*keys, "position_accuracy"):
            assert 0 <= report[prefix + key] <= 1, prefix + key

    tower_file = tmp_path / "tower.safetensors"
    want = load_file(str(tower_file))
    vlm_cfg = load_config(VLM, overrides=[f"data.data_dir={data_dir}"])
    vlm_cfg.model.vision_init = str(tower_file)
    got = flat_params(nnx.jit(lambda: models.build(vlm_cfg, rngs=nnx.Rngs(7)))().vision)
    assert want.keys() == got.keys()
    for k in want:
        if not k.startswith("merger/"):
            np.testing.assert_array_equal(got[k], want[k])
    # The VLM merges 2x2 tokens with a merger of its own (model.vision_init_merger=False).
    wide = 4 * want["merger/ln_q/scale"].shape[0]
    assert got["merger/fc1/kernel"].shape == (wide, wide) != want["merger/fc1/kernel"].shape

    vlm_cfg.model.vision_init = str(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match=r"model.vision_init: .*nope.safetensors do not exist"):
        models.build(vlm_cfg, rngs=nnx.Rngs(0))
