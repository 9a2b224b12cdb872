"""The digits TFDS builder and the Grain pipeline over it: exactness, sharding, resumption."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterable

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorflow_datasets.core import read_only_builder

from pretzel_jax.data import DATASETS, digits, make_iterator, prepare_dataset

SPLIT_SIZES = {"train": 1437, "test": 360}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare(path)
    return path


def make_cfg(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(
        name="digits",
        data_dir=data_dir,
        batch_size=32,
        num_workers=0,
        seed=7,
        shuffle=True,
        drop_remainder=False,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def record_counts(images: Iterable[np.ndarray], labels: Iterable[int]) -> Counter:
    """Multiset of (label, image bytes): records are shuffled on write, so compare as multisets."""
    return Counter(
        (int(label), np.asarray(image, np.uint8).tobytes())
        for image, label in zip(images, labels, strict=True)
    )


def batch_counts(batches: Iterable[dict[str, np.ndarray]]) -> Counter:
    counts = Counter()
    for batch in batches:
        counts += record_counts(batch["image"], batch["label"])
    return counts


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# --- builder ---------------------------------------------------------------------------------


def test_split_is_stratified_disjoint_and_complete():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, test = digits.stratified_split(labels, digits.NUM_TEST, digits.SPLIT_SEED)
    assert (len(train), len(test)) == (SPLIT_SIZES["train"], SPLIT_SIZES["test"])
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    # Every class gives 36 +- 1 of the 360 test images.
    assert set(np.bincount(labels[test], minlength=10)) <= {35, 36, 37}
    again = digits.stratified_split(labels, digits.NUM_TEST, digits.SPLIT_SEED)
    np.testing.assert_array_equal(test, again[1])


def test_build_reads_back_sklearn_data_exactly(data_dir: str):
    from sklearn.datasets import load_digits

    builder = read_only_builder.builder_from_files("digits", data_dir=data_dir)
    assert builder.info.features["label"].num_classes == digits.NUM_CLASSES
    expected = digits.load_split_arrays()
    all_records = Counter()
    for split, size in SPLIT_SIZES.items():
        source = builder.as_data_source(split)
        assert len(source) == size
        records = [source[i] for i in range(len(source))]
        assert {r["image"].shape for r in records} == {digits.IMAGE_SHAPE}
        assert {r["image"].dtype for r in records} == {np.dtype(np.uint8)}
        got = record_counts([r["image"] for r in records], [r["label"] for r in records])
        assert got == record_counts(*expected[split])
        all_records += got

    sk = load_digits()
    assert all_records == record_counts(sk.images, sk.target)
    assert max(image.max() for image, _ in expected.values()) == digits.NUM_LEVELS - 1


def test_prepare_is_idempotent(data_dir: str):
    builder = read_only_builder.builder_from_files("digits", data_dir=data_dir)
    info_file = builder.data_path / "dataset_info.json"
    before = info_file.stat().mtime
    prepare_dataset("digits", data_dir)
    assert info_file.stat().mtime == before


# --- pipeline --------------------------------------------------------------------------------


def test_batches_have_right_shapes_and_dtypes(data_dir: str):
    batch = next(make_iterator(make_cfg(data_dir), "train"))
    assert batch["image"].shape == (32, *digits.IMAGE_SHAPE)
    assert batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,)
    assert batch["label"].dtype == np.int32


def test_one_epoch_covers_split_exactly_once(data_dir: str):
    batches = list(make_iterator(make_cfg(data_dir), "test", num_epochs=1))
    assert [len(b["label"]) for b in batches] == [32] * 11 + [8]  # last partial batch kept
    assert batch_counts(batches) == record_counts(*digits.load_split_arrays()["test"])

    dropped = list(make_iterator(make_cfg(data_dir, drop_remainder=True), "test", num_epochs=1))
    assert len(dropped) == 11


def test_epochs_are_reshuffled_and_deterministic_in_seed(data_dir: str):
    cfg = make_cfg(data_dir, batch_size=40)  # 9 batches per epoch of the 360 test images
    first = take(make_iterator(cfg, "test", shuffle=True), 18)
    epoch0, epoch1 = first[:9], first[9:]
    assert batch_counts(epoch0) == batch_counts(epoch1)
    assert not np.array_equal(epoch0[0]["label"], epoch1[0]["label"])
    second = take(make_iterator(cfg, "test", shuffle=True), 18)
    assert_same_batches(first, second)
    other_seed = next(
        make_iterator(make_cfg(data_dir, batch_size=40, seed=8), "test", shuffle=True)
    )
    assert not np.array_equal(first[0]["image"], other_seed["image"])
    # Held-out splits are not shuffled unless asked: stored order.
    source = read_only_builder.builder_from_files("digits", data_dir=data_dir).as_data_source(
        "test"
    )
    unshuffled = next(make_iterator(cfg, "test"))
    np.testing.assert_array_equal(unshuffled["label"], [source[i]["label"] for i in range(40)])


def test_processes_read_disjoint_halves(data_dir: str):
    cfg = make_cfg(data_dir, batch_size=64)
    per_process = [
        list(make_iterator(cfg, "train", process_index=i, process_count=2, num_epochs=1))
        for i in range(2)
    ]
    assert {len(b["label"]) for b in per_process[0][:-1]} == {32}  # 64 global -> 32 per process
    sizes = [sum(len(b["label"]) for b in batches) for batches in per_process]
    assert sizes == [719, 718]
    union = batch_counts(per_process[0]) + batch_counts(per_process[1])
    assert union == record_counts(*digits.load_split_arrays()["train"])


def test_set_state_resumes_exactly_mid_epoch(data_dir: str):
    it = make_iterator(make_cfg(data_dir), "train")
    take(it, 7)
    state = it.get_state()
    expected = take(it, 50)  # crosses the epoch boundary (45 batches per epoch)
    resumed = make_iterator(make_cfg(data_dir), "train")
    resumed.set_state(state)
    assert_same_batches(take(resumed, 50), expected)


def test_orbax_checkpoint_manager_round_trip(data_dir: str, tmp_path):
    it = make_iterator(make_cfg(data_dir), "train")
    take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 10)

    resumed = make_iterator(make_cfg(data_dir), "train")
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == 5
        manager.restore(
            5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed))
        )
    assert_same_batches(take(resumed, 10), expected)


def test_worker_processes_give_the_same_batches(data_dir: str):
    expected = take(make_iterator(make_cfg(data_dir), "train"), 6)
    it = make_iterator(make_cfg(data_dir, num_workers=2), "train")
    try:
        assert_same_batches(take(it, 6), expected)
    finally:
        del it  # Stop the workers now, not at interpreter exit (noisy tracebacks).
        gc.collect()


# --- errors a user can cause -----------------------------------------------------------------


def test_missing_data_dir_names_path_and_fix(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        make_iterator(make_cfg(missing), "train")
    assert "pretzel_jax.data.prepare --name digits" in str(err.value)

    empty = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"not found under {empty}"):
        make_iterator(make_cfg(empty), "train")


def test_bad_name_split_and_batch_size_are_clear(data_dir: str):
    with pytest.raises(ValueError, match=r"Unknown data set 'mnist'.*'digits'"):
        make_iterator(make_cfg(data_dir, name="mnist"), "train")
    with pytest.raises(ValueError, match=r"no split 'validation'.*'train', 'test'"):
        make_iterator(make_cfg(data_dir), "validation")
    with pytest.raises(ValueError, match="multiple of the process count"):
        make_iterator(make_cfg(data_dir, batch_size=33), "train", process_index=0, process_count=2)
    cfg = make_cfg(data_dir)
    del cfg["seed"]
    with pytest.raises(KeyError, match="seed"):
        make_iterator(cfg, "train")
    assert {"digits", "shapes_captions", "shapes_vqa"} <= set(DATASETS)  # the prepare registry
