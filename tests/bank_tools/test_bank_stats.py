"""`labels stats`: figures against numpy, the PNGs and stats.json, multi-teacher agreement, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from banktools_helpers import softmax, synth_bank
from pipeline.labels import main

PNG = b"\x89PNG\r\n\x1a\n"


def test_stats_multi_teacher(tmp_path: Path, capsys) -> None:
    skipped = np.zeros(150, bool)
    skipped[7] = True
    bank, x, labels = synth_bank(tmp_path / "b.zarr", t=3, c=7, skipped=skipped)
    plots = tmp_path / "plots"
    assert main(["stats", str(bank), "--plots", str(plots), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "top1" in out and "agreement" in out and "ensemble" in out
    s = json.loads((plots / "stats.json").read_text())
    names = ["0:synth0", "1:synth1", "2:synth2", "ensemble"]
    assert list(s["entries"]) == names and s["n"] == 149
    keep = ~skipped
    xk, yk = x[keep, :, 0], labels[keep]
    preds = [xk[:, k].argmax(-1) for k in range(3)] + [xk.mean(1).argmax(-1)]
    for name, pred, logits in zip(names, preds, [xk[:, 0], xk[:, 1], xk[:, 2], xk.mean(1)]):
        e = s["entries"][name]
        assert e["top1"] == pytest.approx(100 * (pred == yk).mean(), abs=1e-4)
        p = softmax(logits)
        assert e["nll"] == pytest.approx(-np.log(p[np.arange(len(yk)), yk]).mean(), rel=1e-4)
        assert e["entropy_mean"] == pytest.approx((-(p * np.log(p)).sum(-1)).mean(), rel=1e-4)
        assert sum(e["entropy_hist"]) == 149
        per_class = [100 * (pred[yk == c] == c).mean() for c in range(7)]
        np.testing.assert_allclose(e["per_class_accuracy"], per_class, atol=1e-6)
        conf = np.zeros((7, 7), int)
        np.add.at(conf, (yk, pred), 1)
        assert np.array_equal(np.asarray(e["confusion"]), conf)
        assert sum(e["reliability"]["count"]) == 149
    agree = [[(preds[a] == preds[b]).mean() for b in range(3)] for a in range(3)]
    np.testing.assert_allclose(s["agreement"], agree, atol=1e-6)
    expected = {"entropy.png", "reliability.png", "per_class_accuracy.png", "agreement.png",
                *(f"confusion_{n.replace(':', '_')}.png" for n in names)}
    assert set(s["plots"]) == expected
    for f in expected:
        data = (plots / f).read_bytes()
        assert data[:8] == PNG and len(data) > 2000, f
    assert not any(p.name.startswith("plots.tmp-") for p in tmp_path.iterdir())


def test_stats_of_compact_bank_and_refusals(demo_bank: Path, tmp_path: Path, capsys) -> None:
    comp = tmp_path / "k2.zarr"
    assert main(["compact", str(demo_bank), "-o", str(comp), "--topk", "2", "--no-progress"]) == 0
    plots = tmp_path / "p"
    assert main(["stats", str(comp), "--plots", str(plots), "--no-progress"]) == 0
    s = json.loads((plots / "stats.json").read_text())
    assert s["format"] == "topk" and s["n"] == 300 and "agreement" not in s
    assert not (plots / "agreement.png").exists() and (plots / "reliability.png").exists()
    capsys.readouterr()
    assert main(["stats", str(comp), "--plots", str(plots)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["stats", str(comp), "--plots", str(plots), "--view", "3"]) == 2
    assert "--view" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "none.zarr"), "--plots", str(tmp_path / "q")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["stats", str(comp), "--plots", str(plots), "--overwrite", "--no-progress"]) == 0
