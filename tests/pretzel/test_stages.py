"""The curriculum stages 1 -> 2 -> 3 at smoke size through the CLI: frozen weights restored from
their files (never in checkpoints), each stage starting from the previous stage's weights, stage
freeze rules checked at start, bit-exact resume, and the stage-3 train step on a 2x2x2 mesh equal
to the single-device step."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretzel_jax import models
from pretzel_jax.data import make_stage_iterator, prepare_dataset
from pretzel_jax.fae import weights as fae_weights
from pretzel_jax.models.pretzel import _fae
from pretzel_jax.train.__main__ import main
from pretzel_jax.train.config import load_config
from pretzel_jax.vlm import Qwen25VL

EXPERIMENTS = {s: f"experiments/shapes_stage{s}.py" for s in (1, 2, 3)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny data sets, a tiny frozen VLM folder and FAE file (random weights)."""
    root = tmp_path_factory.mktemp("stages")
    data = root / "data"
    for name in ("shapes_captions", "shapes_vqa", "shapes_interleaved", "shapes_edits"):
        prepare_dataset(f"{name}_tiny", str(data))
    config = load_config(EXPERIMENTS[1] + ":test", overrides=[f"data.data_dir={data}"])
    vlm = Qwen25VL(models.vlm_config(config.model), nnx.Rngs(1))
    from pretzel_jax.convert.hf_qwen25vl import save

    save(vlm, root / "hf")
    config.unlock()
    config.model.fae.encoder.path = str(root / "hf")
    fae = _fae(config, rngs=nnx.Rngs(2))
    fae_weights.save(fae, root / "fae.safetensors")
    return root


def _args(files: Path, stage: int, run_dir: Path, *extra: str) -> list[str]:
    args = ["--config", EXPERIMENTS[stage] + ":test", "--run_dir", str(run_dir)]
    args += [
        f"--config.data.data_dir={files / 'data'}",
        f"--config.model.pretzel.vlm_path={files / 'hf'}",
        f"--config.model.pretzel.fae_path={files / 'fae.safetensors'}",
        f"--config.model.fae.encoder.path={files / 'hf'}",
    ]
    if stage > 1:
        prev = run_dir.parent / f"stage{stage - 1}" / "pretzel.safetensors"
        args.append(f"--config.model.pretzel.init_from={prev}")
    return args + list(extra)


def _checkpoint_arrays(run_dir: Path, step: int) -> set[str]:
    """Parameter paths stored in a checkpoint's state item (from orbax's tree metadata)."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(run_dir / "checkpoints" / str(step) / "state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat}


@pytest.mark.slow
def test_three_stages_chain_resume_and_keep_frozen_weights_out(files, tmp_path, capsys):
    for stage in (1, 2, 3):
        run = tmp_path / f"stage{stage}"
        assert main(_args(files, stage, run)) == 0
        # The run ends by saying where its outputs are.
        assert f"done at step 4: {run} holds " in capsys.readouterr().out
        assert (run / "pretzel.safetensors").is_file() and (run / "report.json").is_file()
        stored = _checkpoint_arrays(run, 4)
        groups = {p.split("/")[0] for p in stored}
        trained = {1: {"deep", "shallow"}, 2: {"adapter"}, 3: {"deep", "shallow", "adapter"}}
        assert trained[stage] <= groups, groups
        assert not groups & {"vlm", "fae"}, "frozen weights were written into a checkpoint"
        if stage == 2:
            assert groups == {"adapter"}
    report = json.loads((tmp_path / "stage3" / "report.json").read_text())
    for key in ("image_bits_per_dim", "fae_vqa_accuracy", "text_logits_max_abs_diff"):
        assert key in report, key
    # Stage 2 changed only A: its text logits without images are the frozen VLM's exactly.
    stage2 = json.loads((tmp_path / "stage2" / "report.json").read_text())
    assert stage2["text_logits_max_abs_diff"] == 0.0
    # Bit-exact resume of stage 2 from its step-2 checkpoint.
    run = tmp_path / "stage2"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    before = [r["loss"] for r in rows if r["step"] == 4 and "loss" in r]
    shutil.rmtree(run / "checkpoints" / "4")
    assert main(_args(files, 2, run)) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    after = [r["loss"] for r in rows if r["step"] == 4 and "loss" in r]
    assert after == before and len(before) == 1  # logged once: rows past the restore dropped
    _sample_cli(tmp_path / "stage3", tmp_path / "samples")


def _sample_cli(run: Path, out: Path) -> None:
    """`python -m pretzel_jax.sample` on a stage's run folder writes PNGs and a record per
    prompt; every mode samples; a folder that is not a finished stage is one clear error."""
    from PIL import Image

    from pretzel_jax.sample.__main__ import main as sample
    from pretzel_jax.sample.pretzel_modes import load_run, run_mode

    texts = ["--text", "a red circle", "--text", "two"]
    negative = ["--negative", "a blue square"]  # CFG away from it, not the empty prompt
    sample(["t2i", "--run", str(run), *texts, "--out", str(out), "--jacobi_chunk", "16", *negative])
    record = json.loads((out / "record.json").read_text())
    assert all(0 < s["jacobi_calls"] <= 64 for s in record["samples"])  # Jacobi decoded them
    assert record["negative"] == "a blue square"
    assert [s["prompt"] for s in record["samples"]] == ["a red circle", "two"]
    for s in record["samples"]:
        assert len(s["images"]) == 1 and Image.open(out / s["images"][0]).size == (32, 32)
    model, layout = load_run(run)
    image = np.full((32, 32, 3), 200, np.uint8)
    # mode -> (images it must make, max_new: interleave opens an image of 64 latents at once)
    want = {"understand": (0, 8), "interleave": (1, 70), "edit": (1, 0), "reason": (None, 8)}
    for mode, (n_images, max_new) in want.items():
        res = run_mode(
            model, layout, mode, text="a red circle", image=image, key=jax.random.key(0),
            guidance=0.0, max_new=max_new,
        )  # fmt: skip
        assert n_images is None or len(res["u"]) == n_images, (mode, res["reason"])
    with pytest.raises(SystemExit, match="config.json is missing"):
        sample(["t2i", "--run", str(out), "--text", "a"])
    with pytest.raises(SystemExit, match="applies to mode t2i"):
        sample(["reason", "--run", str(run), "--text", "a", *negative])


def test_stage_rules_and_bad_inputs_fail_at_start(files, tmp_path, capsys):
    base = _args(files, 1, tmp_path / "bad")
    cases = [
        (["--config.optim.freeze=^vlm/,^fae/,^adapter/,^w_vlm/"], r"must not train \['w_d'\]"),
        (["--config.optim.freeze=^vlm/,^fae/,^adapter/,^w_vlm/,^w_d/,^x/"], "matches no parameter"),
        (["--config.model.vlm.text.num_layers=3"], "does not match config.model.vlm"),
        ([f"--config.model.pretzel.vlm_path={tmp_path / 'missing'}"], "vlm_path=.*does not exist"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) != 0
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert main(_args(files, 2, tmp_path / "stage2")) != 0  # stage 1's file does not exist
    assert "init_from" in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("checkpoints/*"))


def test_stage3_step_on_a_2x2x2_mesh_equals_one_device(files):
    from pretzel_jax.train.mesh import make_mesh
    from pretzel_jax.train.state import build_setup, init_rest, init_state
    from pretzel_jax.train.step import make_train_step, shard_batch

    overrides = [
        f"data.data_dir={files / 'data'}",
        f"model.pretzel.vlm_path={files / 'hf'}",
        f"model.pretzel.fae_path={files / 'fae.safetensors'}",
        f"model.fae.encoder.path={files / 'hf'}",
        "model.pretzel.init_from=",
    ]
    results = []
    for mesh_cfg, devices in (
        ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()),
        ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
    ):
        config = load_config(EXPERIMENTS[3] + ":test", overrides=overrides)
        config.unlock()
        config.mesh.update(mesh_cfg)
        mesh = make_mesh(config.mesh, devices)
        setup = build_setup(config, mesh, models.build)
        state, rest = init_state(setup), init_rest(setup)
        batch = next(make_stage_iterator(config.data, "train"))
        step = make_train_step(setup)
        state, metrics = step(state, shard_batch(batch, mesh, setup.rules), rest)
        results.append(jax.device_get((state.params, metrics)))
    (p8, m8), (p1, m1) = results
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert jnp.isfinite(m8["loss"])
