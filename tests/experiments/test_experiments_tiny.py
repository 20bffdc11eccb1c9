"""Every results suite runs end to end in its tiny configuration (keeps the experiment code alive)."""

from __future__ import annotations

import pytest

from pipeline.experiments import SCALES, main, suites


@pytest.mark.slow
def test_all_suites_tiny(tmp_path, demo_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    md = tmp_path / "RESULTS.md"
    rc = main(["all", "--scale", "tiny", "--root", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data"),
               "--results", str(md), "--cache", str(tmp_path / "banks")])
    assert rc == 0
    text = md.read_text()
    for name in suites(SCALES["tiny"]):
        assert f"<!-- suite:{name} -->" in text and f"<!-- /suite:{name} -->" in text
        assert (tmp_path / "results" / f"{name}.png").is_file()
    # Re-running reuses every finished run and rewrites sections in place (no duplicates).
    rc = main(["methods", "--scale", "tiny", "--root", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data"),
               "--results", str(md), "--cache", str(tmp_path / "banks")])
    assert rc == 0
    assert md.read_text().count("<!-- suite:methods -->") == 1


def test_unknown_suite_is_a_usage_error(capsys):
    assert main(["nope", "--scale", "tiny"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
