"""`python -m pretzel_jax.data.prepare`: several names, views built once, bad worker counts."""

import pytest

from pretzel_jax.data import prepare


def test_views_build_their_source_once(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(prepare, "prepare_dataset", lambda name, d: calls.append((name, d)))
    names = ["shapes_cells", "shapes_vqa", "shapes_captions", "shapes_images"]
    prepare.main([a for n in names for a in ("--name", n)] + ["--data_dir", str(tmp_path)])
    assert calls == [("shapes_cells", str(tmp_path)), ("shapes_vqa", str(tmp_path))]
    assert "ready under" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare.main(["--name", "digits", "--data_dir", str(tmp_path), "--workers", "0"])
    assert "--workers must be >= 1" in capsys.readouterr().err
