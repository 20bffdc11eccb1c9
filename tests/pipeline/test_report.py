"""``python -m pipeline.report runs/*`` (issue 4, point 8): one table of finished runs with method, teacher bank,
top-1, top-5, ECE and time; runs that reused one bank sit side by side; unfinished runs are skipped."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.report import main
from pipeline.train_student import main as train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_root, demo_bank) -> Path:
    root = tmp_path_factory.mktemp("runs")
    common = ["--student", "democnn_s", "--data", str(demo_root), "--preset", "demo", "--batch-size", "32",
              "--epochs", "1", "--workers", "1", "max_steps_per_epoch=2"]
    # names chosen so that alphabetical order would interleave the bank runs with the bank-less one
    for name, method, bank in (("a-kd", "kd", True), ("b-ce", "ce", False), ("c-wsld", "wsld", True)):
        extra = ["--labels", str(demo_bank)] if bank else []
        assert train(["--method", method, *extra, *common, "--output-dir", str(root / name)]) == 0
    (root / "d-unfinished").mkdir()
    (root / "d-unfinished" / "metrics.jsonl").write_text("")
    (root / "notes.txt").write_text("not a run")
    return root


def _table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [l for l in text.splitlines() if l.strip()]
    header = lines[0].split()
    return header, {l.split()[0]: l.split() for l in lines[1:]}


def test_report_cli_glob(runs, demo_bank):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(f"{sys.executable} -m pipeline.report {runs}/*", shell=True, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    header, rows = _table(proc.stdout)
    for col in ("method", "bank", "top1", "top5", "ece", "time_s"):
        assert col in header
    assert set(rows) == {"a-kd", "b-ce", "c-wsld"}  # the unfinished run and the file are left out, and named
    assert "2 path(s) left out of the table" in proc.stderr and "d-unfinished (no final.json" in proc.stderr
    for name, row in rows.items():
        f = json.loads((runs / name / "final.json").read_text())
        cell = dict(zip(header, row))
        assert cell["method"] == f["method"]
        assert float(cell["top1"]) == pytest.approx(f["top1"], abs=0.01)
        assert float(cell["top5"]) == pytest.approx(f["top5"], abs=0.01)
        assert float(cell["ece"]) == pytest.approx(f["ece"], abs=1e-4)
        assert float(cell["time_s"]) == pytest.approx(f["train_time_s"], rel=0.01, abs=0.01)
        assert cell["bank"] == (Path(demo_bank).name if f["bank"] else "-")
    # the two runs of one bank are adjacent
    order = list(rows)
    assert abs(order.index("a-kd") - order.index("c-wsld")) == 1


def test_report_json_and_markdown(runs, capsys):
    assert main([str(p) for p in sorted(runs.iterdir())] + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["run"]: r["method"] for r in rows} == {"a-kd": "kd", "b-ce": "ce", "c-wsld": "wsld"}
    assert all(r["epochs"] == 1 and r["teacher"] in ("democnn_s", "-") for r in rows)
    assert main([str(runs / "a-kd"), "--markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| run | method |") and md[1].startswith("|---|") and "| kd |" in md[2]


def test_report_without_finished_runs_is_exit_2(runs, tmp_path, capsys, caplog):
    assert main([str(runs / "d-unfinished"), str(runs / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished runs" in err[0] and "nope (no final.json: unfinished or not a run)" in err[0]
    bad = tmp_path / "e-corrupt"
    bad.mkdir()
    (bad / "final.json").write_text('{"top1": 7')  # a run killed while writing it (or edited by hand)
    assert main([str(bad)]) == 2
    assert "e-corrupt (unreadable final.json" in capsys.readouterr().err
    (bad / "final.json").write_text("[1, 2]")
    with caplog.at_level(logging.WARNING):
        assert main([str(bad), str(runs / "a-kd")]) == 0
    assert "a-kd" in capsys.readouterr().out
    assert "e-corrupt (unreadable final.json: not a JSON object)" in caplog.text


def test_report_shows_every_bank_preset_amp_and_one_format_per_column(tmp_path, demo_root, demo_bank, capsys):
    """A two-bank run lists both banks; preset and amp have columns; numbers keep their column's format."""
    from pipeline.report import collect, format_table

    run = tmp_path / "two"
    assert train(["--method", "sl_kd", "--labels", str(demo_bank), "--labels", str(demo_bank), "--student",
                  "democnn_s", "--data", str(demo_root), "--batch-size", "32", "--epochs", "1", "--workers", "1",
                  "--amp", "bf16", "--output-dir", str(run), "max_steps_per_epoch=2"]) == 0
    capsys.readouterr()
    (row,) = collect([str(run)])
    assert row["bank"] == f"{demo_bank.name}+{demo_bank.name}" and row["preset"] == "demo" and row["amp"] == "bf16"
    fake = dict(row, top1=5.0, top5=99.999, ece=1.5, nll=0.123456, time_s=12)
    header, *lines = format_table([row, fake]).splitlines()
    cells = dict(zip(header.split(), lines[1].split()))
    assert (cells["top1"], cells["top5"], cells["ece"], cells["nll"], cells["time_s"]) == \
        ("5.00", "100.00", "1.5000", "0.1235", "12.00")
