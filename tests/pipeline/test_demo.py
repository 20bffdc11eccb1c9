"""``make demo`` equivalent (issue 4, point 10): the whole flow on the embedded data on CPU (teacher with ce, its
bank dumped once, students ce / kd / wsld from that bank, the report table), with 1 epoch per run."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.data.embedded import FASHION_MNIST_DIR


def test_demo_flow(tmp_path, monkeypatch, capsys, caplog):
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("embedded Fashion-MNIST not installed (make setup installs it)")
    from pipeline.demo import main

    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))  # the bank goes here, not into the repo
    data, out = tmp_path / "data", tmp_path / "runs"
    argv = ["--data", str(data), "--out", str(out), "--train-per-class", "30", "--val-per-class", "10",
            "--epochs", "1"]
    with caplog.at_level(logging.INFO, logger="pipeline.demo"):
        assert main(argv) == 0
    steps = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps[0] == "step 1/5" and steps[-1] == "step 5/5" and {"step 2/5", "step 3/5", "step 4/5"} <= set(steps)
    text = capsys.readouterr().out
    lines = [l for l in text.splitlines() if l.strip()]
    start = next(i for i, l in enumerate(lines) if l.split()[:2] == ["run", "method"])
    header, table = lines[start].split(), lines[start:start + 5]
    assert {"bank", "top1", "top5", "ece", "time_s"} <= set(header)
    rows = {l.split()[0]: dict(zip(header, l.split())) for l in table[1:]}
    assert set(rows) == {"teacher-ce", "student-ce", "student-kd", "student-wsld"}
    banks = sorted((tmp_path / "cache").glob("*/democnn-*.zarr"))
    assert len(banks) == 2  # the train bank, dumped once from the teacher's best checkpoint, and its val bank
    banks = [b for b in banks if "-train" in b.parent.name] + [b for b in banks if "-val" in b.parent.name]
    assert len(banks) == 2, banks
    assert lines[start + 5] == f"label bank: {banks[0]} (val: {banks[1]})"  # where its banks and runs are
    assert lines[start + 6].startswith(f"runs:       {out}/ (teacher-ce, student-ce")
    assert lines[start + 7] == f"again:      python -m pipeline.report {out}"
    from pipeline.report import main as report

    assert report(lines[start + 7].split()[3:]) == 0  # the printed command works
    assert [l for l in capsys.readouterr().out.splitlines() if l.strip()] == table
    for m in ("kd", "wsld"):
        f = json.loads((out / f"student-{m}" / "final.json").read_text())
        assert f["bank"].endswith(banks[0].name) and f["teacher"] == "democnn" and f["epochs"] == 1
        assert rows[f"student-{m}"]["bank"] == banks[0].name
    assert rows["student-ce"]["bank"] == "-" and rows["teacher-ce"]["student"] == "democnn"
    for m in ("kd", "wsld"):  # the val bank gives the students' agreement with the teacher and the KL
        assert 0 <= float(rows[f"student-{m}"]["agree"]) <= 100 and float(rows[f"student-{m}"]["kl"]) >= 0
    # a second run reuses every step and prints the same table
    assert main(argv) == 0
    again = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert again[-8:] == table + lines[start + 5:start + 8]
    # a finished run of another bank (a stale runs/ folder from older data) is trained again, not reused
    import yaml

    cfg_path = out / "student-kd" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["banks"] = [str(tmp_path / "an-older-bank.zarr")]
    cfg_path.write_text(yaml.safe_dump(cfg))
    (out / "student-kd" / "final.json").write_text(json.dumps({**json.loads((out / "student-kd" / "final.json")
                                                                          .read_text()), "bank": "stale"}))
    assert main(argv) == 0
    assert json.loads((out / "student-kd" / "final.json").read_text())["bank"].endswith(banks[0].name)
    assert yaml.safe_load(cfg_path.read_text())["banks"] == [str(banks[0])]
    # an interrupted run (a checkpoint, no final.json) resumes from its checkpoint: no epoch trained again
    (out / "student-kd" / "final.json").unlink()
    epochs = (out / "student-kd" / "metrics.jsonl").read_text()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.demo"):
        assert main(argv) == 0
    assert f"resuming interrupted run {out / 'student-kd'}" in caplog.text
    assert (out / "student-kd" / "final.json").is_file()
    assert (out / "student-kd" / "metrics.jsonl").read_text() == epochs
