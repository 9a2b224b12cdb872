"""Real-format builders: each format builds from small files written here, reads back exactly,
and skips, counts and logs every bad entry by location; too many bad entries stop the build."""

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pretzel_jax.data import schema
from pretzel_jax.data.formats import (
    BadRecordsError,
    common,
    prepare_edits,
    prepare_interleaved,
    prepare_llava,
    prepare_webdataset,
    read_reports,
)
from pretzel_jax.data.formats.__main__ import main as cli_main

USER, ASSISTANT, NONE = schema.ROLE_USER, schema.ROLE_ASSISTANT, schema.ROLE_NONE
TEXT, IMAGE = schema.KIND_TEXT, schema.KIND_IMAGE
LOGGER = "pretzel_jax.data.formats"


def _image(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _save(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(array))
    return path.name


def _corrupt_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(_image(99, 16, 16))[:60])  # valid header, truncated data


def _read(dataset: str, data_dir: Path, split: str = "train") -> list[schema.Document]:
    source = tfds.data_source(dataset, data_dir=str(data_dir), split=split)
    return [schema.decode_record(source[i]) for i in range(len(source))]


def _layout(doc: schema.Document) -> list[tuple[int, int, bool, str]]:
    """(kind, role, target, text) per segment."""
    return [(s.kind, s.role, s.target, s.text) for s in doc.segments]


def _check_report(report, written: int, skipped: dict[str, int], locations: list[str], caplog):
    """Counts, stored locations in order, and one WARNING per bad entry naming its location."""
    assert report.written == written
    assert report.skipped == skipped
    assert report.total == written + sum(skipped.values())
    assert [e["location"] for e in report.examples] == locations
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    warnings = [m for m in warnings if m.startswith(f"{report.source}: ")]
    assert len(warnings) == len(locations)
    for message, location in zip(warnings, locations):
        assert f"skipped {location} (" in message


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# WebDataset


def test_webdataset_builds_reads_back_and_skips_bad_samples(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    shards = tmp_path / "shards"
    shards.mkdir()
    a, b, c = _image(0), _image(1, 4, 7), _image(2)
    rgba = np.concatenate([_image(3), np.full((6, 5, 1), 255, np.uint8)], -1)
    rgba[0, 0, 3] = 0  # one transparent pixel: composited over white
    jpeg = _encode(c, "JPEG")
    _write_tar(
        shards / "00000.tar",
        [
            ("000.png", _encode(a)),
            ("000.txt", b"  a red circle \n"),
            ("000.json", b'{"caption": "ignored: the .txt wins"}'),
            ("001.webp", _encode(b, "WEBP", lossless=True)),
            ("001.json", json.dumps({"caption": "two squares", "url": "x"}).encode()),
            ("002.txt", b"no image here"),  # missing image
            ("003.png", _encode(a)[:50]),  # corrupt image
            ("003.txt", b"broken"),
        ],
    )
    _write_tar(
        shards / "00001.tar",
        [
            ("sub/004.jpg", jpeg),
            ("sub/004.txt", b"a photo"),
            ("005.png", _encode(a)),
            ("005.json", b"{not json"),  # bad json
            ("006.png", _encode(rgba)),
            ("006.json", json.dumps({"text": "wrong field"}).encode()),  # missing caption
            ("007.PNG", _encode(rgba)),  # extension case does not matter
            ("007.txt", "un cercle ros\u00e9".encode()),
            ("006.txt", b"again"),  # key 006 reappears after 007: not adjacent
        ],
    )

    reports = prepare_webdataset(shards, tmp_path / "tfds", name="toy", max_bad_fraction=0.9)

    docs = _read("webdataset_captions/toy", tmp_path / "tfds")
    assert [d.id for d in docs] == [
        "00000.tar:000",
        "00000.tar:001",
        "00001.tar:sub/004",
        "00001.tar:007",
    ]
    assert {d.task for d in docs} == {"caption"}
    assert [_layout(d) for d in docs] == [
        [(TEXT, NONE, False, caption), (IMAGE, NONE, True, "")]
        for caption in ["a red circle", "two squares", "a photo", "un cercle ros\u00e9"]
    ]
    expected_rgba = rgba[..., :3].copy()
    expected_rgba[0, 0] = 255
    expected = [a, b, np.asarray(Image.open(io.BytesIO(jpeg))), expected_rgba]
    for doc, image in zip(docs, expected):
        np.testing.assert_array_equal(doc.segments[1].image, image)
    _check_report(
        reports["train"],
        written=4,
        skipped={
            "missing_file": 1,
            "corrupt_image": 1,
            "bad_json": 1,
            "missing_field": 1,
            "bad_structure": 1,
        },
        locations=[
            "00000.tar:002",
            "00000.tar:003",
            "00001.tar:005",
            "00001.tar:006",
            "00001.tar:006",
        ],
        caplog=caplog,
    )
    assert read_reports("webdataset_captions/toy", tmp_path / "tfds") == reports


@pytest.mark.parametrize("cut", ["header", "data"])
def test_webdataset_truncated_shard_keeps_what_came_before(tmp_path, caplog, cut):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    shard = tmp_path / "00000.tar"
    _write_tar(
        shard,
        [
            (f"{k:03d}.{e}", _encode(_image(k)) if e == "png" else b"cap")
            for k in range(3)
            for e in ("png", "txt")
        ],
    )
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # Cut into the header of 002.txt, or into the pixels of 002.png.
    size = members[5].offset + 100 if cut == "header" else members[4].offset_data + 50
    shard.write_bytes(shard.read_bytes()[:size])

    reports = prepare_webdataset(shard, tmp_path / "tfds", max_bad_fraction=0.5)

    docs = _read("webdataset_captions/default", tmp_path / "tfds")
    assert [d.id for d in docs] == ["00000.tar:000", "00000.tar:001"]
    report = reports["train"]
    assert (report.total, report.written, report.skipped) == (3, 2, {"unreadable_file": 1})
    assert report.examples[0]["location"] == "00000.tar:002"
    assert "breaks off" in report.examples[0]["detail"]
    assert "skipped 00000.tar:002 (unreadable_file)" in caplog.text


def test_same_sources_give_the_same_records_with_any_thread_count(tmp_path):
    shard = tmp_path / "00000.tar"
    _write_tar(
        shard,
        [
            (f"{k:03d}.{e}", _encode(_image(k)) if e == "png" else b"x %d" % k)
            for k in range(12)
            for e in ("png", "txt")
        ],
    )
    files = []
    for threads in (1, 3):
        prepare_webdataset(shard, tmp_path / f"tfds{threads}", num_threads=threads)
        folder = tmp_path / f"tfds{threads}" / "webdataset_captions" / "default" / "1.0.0"
        files.append(sorted(folder.glob("*.array_record*")))
    assert [f.name for f in files[0]] == [f.name for f in files[1]]
    for one, three in zip(*files):
        assert one.read_bytes() == three.read_bytes()
    docs = _read("webdataset_captions/default", tmp_path / "tfds1")
    assert [d.segments[0].text for d in docs] == [f"x {k}" for k in range(12)]


# ---------------------------------------------------------------------------------------------
# LLaVA


def test_llava_builds_reads_back_and_skips_bad_entries(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    root = tmp_path / "images"
    a, b = _image(10), _image(11, 3, 9)
    _save(root / "coco" / "a.png", a)
    _save(root / "b.png", b)
    _corrupt_png(root / "broken.png")

    def conv(*turns):
        return [{"from": f, "value": v} for f, v in turns]

    entries = [
        {
            "id": "q1",
            "image": "coco/a.png",
            "conversations": conv(
                ("human", "<image>\nWhat colour?"),
                ("gpt", "Red."),
                ("human", "How many?"),
                ("gpt", "Two."),
            ),
        },
        {
            "id": "q2",
            "image": ["b.png", "coco/a.png"],
            "conversations": conv(("user", "Compare <image> with<image>"), ("assistant", "Same.")),
        },
        {"id": "t", "conversations": conv(("human", "Hi"), ("gpt", "Hello"))},  # text only
        {
            "id": "e3",
            "image": "missing.png",
            "conversations": conv(("human", "<image>"), ("gpt", "x")),
        },
        {
            "id": "e4",
            "image": "broken.png",
            "conversations": conv(("human", "<image>"), ("gpt", "x")),
        },
        {"id": "e5", "image": "b.png", "conversations": conv(("human", "no marker"), ("gpt", "x"))},
        {"id": "e6", "conversations": conv(("human", "<image> but no image"), ("gpt", "x"))},
        {"id": "e7", "image": "b.png", "conversations": conv(("human", "q"), ("gpt", "<image>"))},
        {"id": "e8", "conversations": conv(("system", "be nice"), ("gpt", "x"))},
        {"id": "e9", "image": "b.png"},  # no conversations
        {"id": "e10", "conversations": conv(("human", "only a question"))},
        "not an object",
    ]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    (tmp_path / "val.jsonl").write_text(json.dumps(entries[0]) + "\n\n{oops\n")

    reports = prepare_llava(
        {"train": tmp_path / "train.json", "validation": tmp_path / "val.jsonl"},
        tmp_path / "tfds",
        image_root=root,
        max_bad_fraction=0.9,
    )

    docs = _read("llava_conversations/default", tmp_path / "tfds")
    assert [(d.id, d.task) for d in docs] == [
        ("train.json[0]", "vqa"),
        ("train.json[1]", "vqa"),
        ("train.json[2]", "text"),
    ]
    assert _layout(docs[0]) == [
        (IMAGE, USER, False, ""),
        (TEXT, USER, False, "What colour?"),
        (TEXT, ASSISTANT, True, "Red."),
        (TEXT, USER, False, "How many?"),
        (TEXT, ASSISTANT, True, "Two."),
    ]
    assert _layout(docs[1]) == [
        (TEXT, USER, False, "Compare"),
        (IMAGE, USER, False, ""),
        (TEXT, USER, False, "with"),
        (IMAGE, USER, False, ""),
        (TEXT, ASSISTANT, True, "Same."),
    ]
    assert _layout(docs[2]) == [(TEXT, USER, False, "Hi"), (TEXT, ASSISTANT, True, "Hello")]
    np.testing.assert_array_equal(docs[0].images[0], a)
    assert len(docs[1].images) == 2
    np.testing.assert_array_equal(docs[1].images[0], b)
    np.testing.assert_array_equal(docs[1].images[1], a)
    val = _read("llava_conversations/default", tmp_path / "tfds", "validation")
    assert [d.id for d in val] == ["val.jsonl:1"]
    assert _layout(val[0]) == _layout(docs[0])

    bad = [f"train.json[{i}]" for i in range(3, 12)]
    assert reports["train"].skipped == {
        "missing_file": 1,
        "corrupt_image": 1,
        "bad_structure": 5,
        "missing_field": 1,
        "bad_json": 1,
    }
    assert reports["validation"].skipped == {"bad_json": 1}
    assert reports["validation"].examples[0]["location"] == "val.jsonl:3"
    _check_report(
        reports["train"],
        3,
        reports["train"].skipped,
        bad,
        caplog=caplog,
    )
    details = [e["detail"] for e in reports["train"].examples]
    assert "0 <image> markers in human turns but 1 images" in details[2]
    assert "1 <image> markers in human turns but 0 images" in details[3]
    assert "system" in details[5]


# ---------------------------------------------------------------------------------------------
# Interleaved


def test_interleaved_builds_reads_back_and_skips_bad_documents(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    root = tmp_path / "imgs"
    a, b = _image(20), _image(21, 8, 3)
    grey = np.random.default_rng(22).integers(0, 256, (5, 4), dtype=np.uint8)
    _save(root / "a.png", a)
    _save(root / "b.png", b)
    (root / "grey.png").write_bytes(_encode(grey))
    _corrupt_png(root / "broken.png")
    lines = [
        {
            "texts": ["Intro.", None, "", None, "End."],
            "images": [None, "a.png", None, "b.png", None],
        },
        {"texts": [None, "caption"], "images": ["grey.png", None], "metadata": {"url": "u"}},
        {"texts": ["just text"], "images": [None]},
        "{this is not json",
        {"texts": ["x"]},
        {"texts": ["x", None], "images": [None]},
        {"texts": ["x", "y"], "images": [None, "a.png"]},
        {"texts": [None], "images": ["nowhere.png"]},
        {"texts": [None], "images": ["broken.png"]},
        {"texts": [None, None], "images": [None, "a.png"]},
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (tmp_path / "docs.jsonl").write_text(text + "\n\n")

    reports = prepare_interleaved(
        tmp_path / "docs.jsonl", tmp_path / "tfds", image_root=root, max_bad_fraction=0.9
    )

    docs = _read("interleaved_documents/default", tmp_path / "tfds")
    assert [(d.id, d.task) for d in docs] == [
        ("docs.jsonl:1", "interleaved"),
        ("docs.jsonl:2", "interleaved"),
        ("docs.jsonl:3", "text"),
    ]
    assert _layout(docs[0]) == [
        (TEXT, NONE, True, "Intro."),
        (IMAGE, NONE, True, ""),
        (IMAGE, NONE, True, ""),
        (TEXT, NONE, True, "End."),
    ]
    assert _layout(docs[1]) == [(IMAGE, NONE, True, ""), (TEXT, NONE, True, "caption")]
    np.testing.assert_array_equal(docs[0].images[0], a)
    np.testing.assert_array_equal(docs[0].images[1], b)
    np.testing.assert_array_equal(docs[1].images[0], np.repeat(grey[..., None], 3, -1))
    _check_report(
        reports["train"],
        written=3,
        skipped={
            "bad_json": 1,
            "missing_field": 1,
            "bad_structure": 3,
            "missing_file": 1,
            "corrupt_image": 1,
        },
        locations=[f"docs.jsonl:{n}" for n in range(4, 11)],
        caplog=caplog,
    )
    details = [e["detail"] for e in reports["train"].examples]
    assert "'texts' has 2 entries but 'images' has 1" in details[2]
    assert "position 1 has both" in details[3]
    assert "position 0 has neither" in details[6]


# ---------------------------------------------------------------------------------------------
# Editing triplets


def _write_edits(tmp_path: Path, lines: list) -> Path:
    src = tmp_path / "edits" / "triplets.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return src


def test_edits_build_read_back_and_skip_bad_triplets(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    src_img, tgt_img = _image(30), _image(31)
    _save(tmp_path / "edits" / "img" / "s.png", src_img)
    _save(tmp_path / "edits" / "img" / "t.png", tgt_img)
    _corrupt_png(tmp_path / "edits" / "img" / "broken.png")
    good = {"source": "img/s.png", "instruction": " make it red ", "target": "img/t.png"}
    src = _write_edits(
        tmp_path,
        [
            good,
            {"source": "img/s.png", "target": "img/t.png"},
            {**good, "target": "img/gone.png"},
            {**good, "source": "img/broken.png"},
            ["a", "list"],
            {**good, "instruction": ""},
        ],
    )

    reports = prepare_edits(src, tmp_path / "tfds", max_bad_fraction=0.9)  # image root: src dir

    (doc,) = _read("edit_triplets/default", tmp_path / "tfds")
    assert (doc.id, doc.task) == ("triplets.jsonl:1", "edit")
    assert _layout(doc) == [
        (IMAGE, NONE, False, ""),
        (TEXT, NONE, False, "make it red"),
        (IMAGE, NONE, True, ""),
    ]
    np.testing.assert_array_equal(doc.images[0], src_img)
    np.testing.assert_array_equal(doc.images[1], tgt_img)
    _check_report(
        reports["train"],
        written=1,
        skipped={"missing_field": 2, "missing_file": 1, "corrupt_image": 1, "bad_json": 1},
        locations=[f"triplets.jsonl:{n}" for n in range(2, 7)],
        caplog=caplog,
    )
    assert "'instruction'" in reports["train"].examples[0]["detail"]
    assert "gone.png" in reports["train"].examples[1]["detail"]


# ---------------------------------------------------------------------------------------------
# The bad-record limit, reuse, images, CLI


def test_too_many_bad_records_stop_the_build_with_one_clear_error(tmp_path):
    _save(tmp_path / "edits" / "s.png", _image(40))
    good = {"source": "s.png", "instruction": "flip", "target": "s.png"}
    src = _write_edits(tmp_path, [good, good, {**good, "target": "gone.png"}, good])

    with pytest.raises(BadRecordsError) as error:
        prepare_edits(src, tmp_path / "tfds", max_bad_fraction=0.2)
    message = str(error.value)
    assert "1 of 4 entries are bad" in message
    assert "max_bad_fraction=0.2" in message
    assert "{'missing_file': 1}" in message
    assert "triplets.jsonl:3 (missing_file:" in message
    assert "--max_bad_fraction" in message
    assert not (tmp_path / "tfds" / "edit_triplets" / "default" / "1.0.0").exists()

    reports = prepare_edits(src, tmp_path / "tfds", max_bad_fraction=0.25)  # 1/4 is allowed
    assert (reports["train"].written, reports["train"].num_skipped) == (3, 1)
    assert len(_read("edit_triplets/default", tmp_path / "tfds")) == 3


def test_a_built_data_set_is_reused_only_with_the_same_knobs(tmp_path):
    _save(tmp_path / "edits" / "s.png", _image(41))
    src = _write_edits(tmp_path, [{"source": "s.png", "instruction": "x", "target": "s.png"}])
    first = prepare_edits(src, tmp_path / "tfds", name="mine")
    (tmp_path / "edits" / "s.png").unlink()  # a rebuild would now fail: reuse reads nothing
    assert prepare_edits(src, tmp_path / "tfds", name="mine") == first
    with pytest.raises(ValueError, match="was built with .*delete"):
        prepare_edits(src, tmp_path / "tfds", name="mine", max_side=4)
    with pytest.raises(ValueError, match="lowercase"):
        prepare_edits(src, tmp_path / "tfds", name="Mine/x")


def test_decode_image_converts_to_rgb_and_resizes():
    rgb = _image(50, 10, 20)
    np.testing.assert_array_equal(common.decode_image(_encode(rgb), "x", None), rgb)
    # Resized to at most max_side on the longer side, aspect kept; smaller images untouched.
    assert common.decode_image(_encode(rgb), "x", 8).shape == (4, 8, 3)
    assert common.decode_image(_encode(rgb), "x", 20).shape == (10, 20, 3)
    # Transparency is composited over white: round(alpha * rgb + (1 - alpha) * 255).
    alpha = np.array([[0, 128, 255]], np.uint8)
    rgba = np.concatenate([np.full((1, 3, 3), 40, np.uint8), alpha[..., None]], -1)
    out = common.decode_image(_encode(rgba), "x", None)
    np.testing.assert_array_equal(out[0, :, 0], [255, round(40 * 128 / 255 + 127), 40])
    # Palette with a transparent index, grayscale, and 16-bit grayscale (high byte).
    palette = Image.fromarray(rgb).quantize(4)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    out = common.decode_image(buffer.getvalue(), "x", None)
    colours = np.asarray(palette.getpalette()[:12], np.uint8).reshape(4, 3)
    expected = colours[np.asarray(palette)]
    expected[np.asarray(palette) == 0] = 255
    np.testing.assert_array_equal(out, expected)
    grey16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    buffer = io.BytesIO()
    Image.fromarray(grey16).save(buffer, format="PNG")
    out = common.decode_image(buffer.getvalue(), "x", None)
    np.testing.assert_array_equal(out, np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1))
    with pytest.raises(common.BadRecord, match="corrupt_image: where.png"):
        common.decode_image(b"not an image", "where.png", None)


def test_cli_builds_and_prints_the_report(tmp_path, capsys):
    _save(tmp_path / "edits" / "s.png", _image(60))
    src = _write_edits(tmp_path, [{"source": "s.png", "instruction": "x", "target": "s.png"}])
    cli_main(
        [
            "edits",
            "--src",
            f"train={src}",
            "--src",
            f"test={src}",
            "--data_dir",
            str(tmp_path / "tfds"),
            "--name",
            "cli",
            "--max_side",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert "train: 1 of 1 written" in out
    assert "edit_triplets/cli is ready" in out
    (doc,) = _read("edit_triplets/cli", tmp_path / "tfds", "test")
    assert doc.images[0].shape == (3, 3, 3)  # 6x5 resized to max side 3
    with pytest.raises(SystemExit):
        cli_main(["edits", "--src", "a", "--src", "b", "--data_dir", str(tmp_path)])


@pytest.mark.parametrize(
    "fmt, args, message",
    [
        ("webdataset", ["--src", "MISSING"], "source {cwd}/MISSING does not exist; give a .tar"),
        ("llava", ["--src", "MISSING.json"], "source {cwd}/MISSING.json does not exist; give a"),
        ("edits", ["--src", "{tmp}", "--name", "Bad-Name"], "name 'Bad-Name' must be lowercase"),
    ],
    ids=["missing_tar", "missing_json", "bad_name"],
)
def test_cli_user_errors_are_one_line(tmp_path, monkeypatch, capsys, fmt, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_:
        cli_main([fmt, *args, "--data_dir", str(tmp_path / "tfds")])
    text = exit_.value.code
    assert text.startswith("error: " + message.format(cwd=tmp_path)), text
    assert "\n" not in text and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "tfds").exists()  # nothing started
