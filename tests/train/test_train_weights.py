"""Weight sources: frozen params restored from files after init, kept out of the train state and
the checkpoints (which record the files' hashes), "init" sources, sharded per-device loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file
from train_toy import build_toy, toy_batch, toy_config, toy_iterator_factory, toy_records

from pretzel_jax.convert.safetensors_io import SafetensorsFolder
from pretzel_jax.train import CheckpointError, ConfigError, train
from pretzel_jax.train.mesh import make_mesh
from pretzel_jax.train.state import build_setup, init_rest, init_state
from pretzel_jax.train.step import make_train_step, shard_batch
from pretzel_jax.train.weights import (
    WeightSource,
    content_hash,
    load_safetensors,
    safetensors_source,
)

FREEZE = "optim.freeze=dense1"
# constant: the LR at a step does not depend on train.steps, so 2 + 2 steps = 4 steps.
BASE = ("optim.schedule=constant", "train.ckpt_every=2")


def _dense1(seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "kernel": (0.3 * rng.normal(size=(8, 16))).astype(dtype),
        "bias": (0.1 * rng.normal(size=(16,))).astype(dtype),
    }


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path))
    return path


def _train(run_dir, steps, sources, *overrides, report=None):
    return train(
        toy_config(*BASE, f"train.steps={steps}", *overrides),
        run_dir,
        make_iterator=toy_iterator_factory(toy_records()),
        build_model=build_toy,
        report=report,
        weight_sources=sources,
    )


def _saved_state(run_dir: Path, step: int) -> dict:
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(run_dir / "checkpoints" / str(step) / "state")


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = ("step_time_s", "examples_per_s")
    rows = [{k: v for k, v in r.items() if k not in timing} for r in rows]
    return [r for r in rows if set(r) != {"step"}]  # not the (empty) report's row


def test_frozen_layer_from_a_file_is_exact_and_outside_the_train_state(tmp_path):
    file = _write(tmp_path / "dense1.safetensors", _dense1())
    config = toy_config(FREEZE)
    setup = build_setup(config, make_mesh(config.mesh), build_toy)
    sources = [safetensors_source("dense1", file)]
    state, rest = init_state(setup, sources), init_rest(setup, sources)
    for name, value in _dense1().items():
        np.testing.assert_array_equal(jax.device_get(rest.frozen["dense1"][name]), value)
    before = jax.device_get(rest.frozen)

    step = make_train_step(setup)
    state, metrics = step(state, shard_batch(toy_batch(), setup.mesh, setup.rules), rest)
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(rest.frozen))):
        np.testing.assert_array_equal(a, b)
    assert not any("dense1" in p for p in _paths(state.params) + _paths(state.opt_state))
    assert any("dense2" in p for p in _paths(state.opt_state))


@pytest.fixture(scope="module")
def frozen_file(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("weights") / "dense1.safetensors", _dense1())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, frozen_file) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    seen = {}

    def report(model, config, data, key, run_dir):
        seen.update(kernel=np.asarray(model.dense1.kernel[...]))
        return {}

    _train(run_dir, 4, [safetensors_source("dense1", frozen_file)], FREEZE, report=report)
    # After 4 steps the frozen layer the model ran with is still the file's, bit for bit.
    np.testing.assert_array_equal(seen["kernel"], _dense1()["kernel"])
    return run_dir


@pytest.fixture(scope="module")
def stopped_at_2(tmp_path_factory, frozen_file) -> Path:
    run_dir = tmp_path_factory.mktemp("stopped")
    _train(run_dir, 2, [safetensors_source("dense1", frozen_file)], FREEZE)
    return run_dir


def test_checkpoints_hold_no_frozen_tensor_but_the_files_hash(uninterrupted, frozen_file):
    step_dir = uninterrupted / "checkpoints" / "4"
    saved = _saved_state(uninterrupted, 4)
    assert set(saved["params"]) == {"dense2", "scale"}
    assert not any("dense1" in p for p in _paths(saved))
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    assert not any("dense1" in p for p in _paths(tree))
    meta = json.loads((step_dir / "config" / "metadata").read_text())
    assert meta["weight_sources"] == [
        {
            "prefix": "dense1",
            "role": "frozen",
            "path": str(frozen_file),
            "sha256": content_hash(frozen_file),
        }
    ]
    # param_policy.txt still lists every parameter, trainable and frozen.
    table = (uninterrupted / "param_policy.txt").read_text()
    assert "dense1/kernel" in table and "dense2/kernel" in table


def test_resume_with_frozen_weights_is_bit_exact(
    uninterrupted, stopped_at_2, frozen_file, tmp_path
):
    run_dir = Path(shutil.copytree(stopped_at_2, tmp_path / "run"))
    result = _train(run_dir, 4, [safetensors_source("dense1", frozen_file)], FREEZE)
    assert result["step"] == 4 and not result["preempted"]
    expected, got = _saved_state(uninterrupted, 4), _saved_state(run_dir, 4)
    assert _paths(got) == _paths(expected)
    for path, a, b in zip(_paths(got), jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(b, a, err_msg=path)  # params, opt state, step, rng
    assert _metrics(run_dir) == _metrics(uninterrupted)


# Orbax's asyncio helpers may complain after a refused restore ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_with_a_changed_or_missing_frozen_file_is_refused(
    stopped_at_2, frozen_file, tmp_path
):
    run_dir = Path(shutil.copytree(stopped_at_2, tmp_path / "run"))
    original, recorded = frozen_file.read_bytes(), content_hash(frozen_file)
    sources = [safetensors_source("dense1", frozen_file)]
    try:
        _write(frozen_file, _dense1(seed=1))  # same names and shapes, other values
        changed = content_hash(frozen_file)
        with pytest.raises(CheckpointError) as err:
            _train(run_dir, 4, sources, FREEZE)
        text = str(err.value)
        assert f"frozen weights {frozen_file} (prefix 'dense1')" in text
        assert recorded in text and changed in text and changed != recorded
        assert "point the config at the original file" in text and "new run dir" in text

        frozen_file.unlink()
        with pytest.raises(CheckpointError, match="do not exist") as err:
            _train(run_dir, 4, sources, FREEZE)
        assert str(frozen_file) in str(err.value) and recorded in str(err.value)
    finally:
        frozen_file.write_bytes(original)
    with pytest.raises(CheckpointError, match="config has no weight source for them"):
        _train(run_dir, 4, [], FREEZE)  # dropping the source would resume with random weights
    assert _train(run_dir, 4, sources, FREEZE)["step"] == 4  # the advised fix


@pytest.mark.parametrize(
    "overrides, prefix, message",
    [
        (
            (),
            "dense1",
            r"'frozen' but covers trainable parameters dense1/bias, dense1/kernel; add them to "
            r"optim.freeze .* or give the source role 'init'",
        ),
        ((FREEZE,), "dense3", r"prefix 'dense3' matches no parameter; fix the prefix"),
        ((FREEZE,), "dense1/kern", r"prefix 'dense1/kern' matches no parameter"),
        ((FREEZE,), None, r"weight files do not exist:\n  weight source 'dense1'"),
    ],
    ids=["frozen_over_trainable", "no_match", "partial_name", "missing_file"],
)
def test_bad_weight_sources_give_one_config_error(
    frozen_file, tmp_path, overrides, prefix, message
):
    path = frozen_file if prefix else tmp_path / "nowhere.safetensors"
    source = safetensors_source(prefix or "dense1", path)
    with pytest.raises(ConfigError, match=message) as err:
        _train(tmp_path / "run", 2, [source], *overrides)
    assert str(path) in str(err.value)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())


def test_init_source_initialises_at_a_fresh_start_and_is_ignored_on_resume(tmp_path):
    weights = {"kernel": np.full((16, 8), 0.05, np.float32), "bias": np.ones(8, np.float32)}
    file = _write(tmp_path / "dense2.safetensors", weights)
    calls = []

    def counted(target):
        calls.append(1)
        return load_safetensors(file)(target)

    source = WeightSource("dense2", str(file), counted, role="init")
    config = toy_config()
    setup = build_setup(config, make_mesh(config.mesh), build_toy)
    state = init_state(setup, [source])
    for name, value in weights.items():
        np.testing.assert_array_equal(jax.device_get(state.params["dense2"][name]), value)
        assert state.params["dense2"][name].sharding == setup.shardings.params["dense2"][name]
    assert not jax.device_get(init_rest(setup, [source]).frozen)  # nothing frozen

    run_dir = tmp_path / "run"
    calls.clear()
    _train(run_dir, 2, [source])
    assert len(calls) == 1
    first = _saved_state(run_dir, 2)["params"]["dense2"]["kernel"]
    assert not np.array_equal(first, weights["kernel"])  # trained from the file's values
    file.unlink()  # on resume the checkpoint's values win: the file is not even read
    assert _train(run_dir, 4, [source])["step"] == 4 and len(calls) == 1
    meta = json.loads((run_dir / "checkpoints" / "4" / "config" / "metadata").read_text())
    assert meta["weight_sources"] == [
        {"prefix": "dense2", "role": "init", "path": str(file), "sha256": None}
    ]


def test_sharded_load_reads_each_devices_slice_in_the_target_sharding(tmp_path, monkeypatch):
    values = _dense1(dtype=ml_dtypes.bfloat16)  # cast to the fp32 params on load
    file = _write(tmp_path / "dense1.safetensors", values)
    config = toy_config(FREEZE, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    setup = build_setup(config, make_mesh(config.mesh), build_toy)
    reads = []
    read = SafetensorsFolder.read
    monkeypatch.setattr(
        SafetensorsFolder,
        "read",
        lambda self, key, index=None: reads.append((key, index)) or read(self, key, index),
    )
    rest = init_rest(setup, [safetensors_source("dense1", file)])

    kernel = rest.frozen["dense1"]["kernel"]
    target = setup.rest_abstract.frozen["dense1"]["kernel"]
    assert len(jax.devices()) == 8 and kernel.sharding == target.sharding
    assert kernel.sharding.spec == P("fsdp", "tensor") and kernel.dtype == np.float32
    for shard in kernel.addressable_shards:
        assert shard.data.shape == (4, 8)  # 8 x 16 over fsdp=2, tensor=2
        expected = values["kernel"][shard.index].astype(np.float32)
        np.testing.assert_array_equal(np.asarray(shard.data), expected)
    kernel_reads = [index for key, index in reads if key == "kernel"]
    assert kernel_reads and all(
        tuple(s.stop - s.start for s in index) == (4, 8) for index in kernel_reads
    )


def test_a_mismatched_safetensors_file_names_every_problem(tmp_path):
    bad = {"kernel": np.zeros((16, 8), np.float32), "extra": np.zeros(3, np.float32)}
    file = _write(tmp_path / "bad.safetensors", bad)
    config = toy_config(FREEZE)
    setup = build_setup(config, make_mesh(config.mesh), build_toy)
    with pytest.raises(ConfigError) as err:
        init_rest(setup, [safetensors_source("dense1", file)])
    text = str(err.value)
    assert text.startswith(f"weight source 'dense1' ({file}): {file} does not hold the param")
    assert "missing keys: bias" in text and "unexpected keys: extra" in text
    assert "kernel: shape (16, 8) in the file, (8, 16) wanted" in text
    assert "keyed by its path relative to the source's prefix" in text

    # With names=, a file shared by several sources may hold other tensors; missing ones count.
    shared = {f"dense1/{k}": v for k, v in _dense1().items()} | {"dense2/bias": np.zeros(8)}
    shared_file = _write(tmp_path / "shared.safetensors", shared)
    names = lambda rel: "/".join(("dense1", *rel))
    rest = init_rest(setup, [safetensors_source("dense1", shared_file, names=names)])
    np.testing.assert_array_equal(
        jax.device_get(rest.frozen["dense1"]["bias"]), shared["dense1/bias"]
    )
    other = r"missing keys: dense2/kernel\n  dense2/bias: shape \(8,\) in the file, \(16,\) wanted"
    with pytest.raises(ConfigError, match=other):
        load_safetensors(shared_file, lambda rel: "/".join(("dense2", *rel)))(
            setup.rest_abstract.frozen["dense1"]
        )

    # A cast that loses the kind (float file -> int parameter) is refused before any read.
    floats = _write(tmp_path / "floats.safetensors", {"kernel": np.zeros((8, 16), np.float32)})
    spec = {"kernel": jax.ShapeDtypeStruct((8, 16), np.int32)}
    with pytest.raises(ConfigError, match="kernel: dtype F32 cannot be cast to int32"):
        load_safetensors(floats)(spec)
