"""`labels ensemble`: values against numpy, attrs, refusals, atomic writes, a dask.distributed cluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from banktools_helpers import corrupt_chunk, softmax, synth_bank, write_bank
from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.labels import main


def _two(tmp_path: Path):
    a, xa, labels = synth_bank(tmp_path / "a.zarr", t=1, seed=0)
    skipped = np.zeros(150, bool)
    skipped[[5, 77]] = True
    b, xb, _ = synth_bank(tmp_path / "b.zarr", t=2, seed=1, skipped=skipped, rows=50)  # different chunking
    xb[skipped] = np.nan
    return a, b, np.concatenate([xa, xb], axis=1), labels, skipped


def test_ensemble_modes_match_numpy(tmp_path: Path, capsys) -> None:
    a, b, x, labels, skipped = _two(tmp_path)
    expect = {
        "mean-logits": x.mean(axis=1, keepdims=True),
        "mean-probs": np.log(softmax(x).mean(axis=1, keepdims=True)),
        "stack": x,
    }
    for mode, want in expect.items():
        out = tmp_path / f"{mode}.zarr"
        assert main(["ensemble", str(a), str(b), "-o", str(out), "--mode", mode, "--no-progress"]) == 0
        assert capsys.readouterr().out.strip().endswith(str(out))
        assert verify_bank(out) == []
        bank = LabelBank(out)
        got = bank.read_logits().astype(np.float32)
        assert got.shape == want.shape and bank.format == "dense" and bank.complete
        assert np.isnan(got[skipped]).all() and np.array_equal(bank.skipped(), skipped)
        keep = ~skipped
        np.testing.assert_allclose(got[keep], want[keep], rtol=2e-3, atol=2e-3)  # fp16 storage
        if mode == "mean-probs":  # log-probabilities: exp sums to one
            np.testing.assert_allclose(np.exp(got[keep]).sum(-1), 1.0, atol=5e-3)
        assert np.array_equal(bank.labels(), labels)
        assert bank.attrs["rows_per_chunk"] == 32  # the first input's chunking
        # attrs: sources, teachers, key, recomputed metrics equal stage 1's
        assert [s["path"] for s in bank.attrs["sources"]] == [str(a.resolve()), str(b.resolve())]
        assert len(bank.teachers) == (3 if mode == "stack" else 1)
        assert bank.attrs["ensemble"]["mode"] == mode and len(bank.attrs["key"]) == 64
        from stage1_teacher_logits.dump import teacher_metrics

        ref = teacher_metrics(bank.group, bank.teachers)
        assert set(ref) == set(bank.attrs["metrics"])
        for name in ref:
            for k in ("top1", "top5", "nll", "ece", "n"):
                assert bank.attrs["metrics"][name][k] == pytest.approx(ref[name][k], abs=1e-4)
    keys = {LabelBank(tmp_path / f"{m}.zarr").attrs["key"] for m in expect}
    assert len(keys) == 3
    # same inputs + mode -> same key
    assert main(["ensemble", str(a), str(b), "-o", str(tmp_path / "again.zarr"), "--mode", "stack",
                 "--no-progress"]) == 0
    assert LabelBank(tmp_path / "again.zarr").attrs["key"] == LabelBank(tmp_path / "stack.zarr").attrs["key"]


def test_ensemble_of_dumped_banks(demo_root: Path, demo_bank: Path, tmp_path: Path) -> None:
    """Two real stage-1 dumps (teacher seeds 0 and 1) averaged; float32 output on request."""
    from pipeline.dump_logits import main as dump

    other = tmp_path / "seed1.zarr"
    assert dump(["--teacher", "democnn_s", "--weights", "none", "--seed", "1", "--data", str(demo_root),
                 "--split", "train", "--preset", "demo", "--batch-size", "32", "--rows-per-chunk", "64",
                 "--out", str(other)]) == 0
    out = tmp_path / "ens.zarr"
    assert main(["ensemble", str(demo_bank), str(other), "-o", str(out), "--dtype", "float32",
                 "--no-progress"]) == 0
    x = np.concatenate([LabelBank(demo_bank).read_logits(), LabelBank(other).read_logits()], 1).astype(np.float32)
    got = LabelBank(out).read_logits()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, x.mean(1, keepdims=True), rtol=1e-6, atol=1e-6)
    assert verify_bank(out) == []
    assert not np.allclose(x[:, 0], x[:, 1])  # the seeds really differ


def _refused(capsys, argv, *words) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_ensemble_refusals(tmp_path: Path, capsys) -> None:
    a, _, labels = synth_bank(tmp_path / "a.zarr")
    x = np.zeros((150, 1, 1, 7), np.float32)
    out = str(tmp_path / "o.zarr")
    cases = {
        "fingerprint": write_bank(tmp_path / "fp.zarr", x, labels, fingerprint="fp-other"),
        "num_classes": write_bank(tmp_path / "c.zarr", np.zeros((150, 1, 1, 8), np.float32), labels),
        "num_samples": write_bank(tmp_path / "n.zarr", x[:100], labels[:100]),
        "classes": write_bank(tmp_path / "cl.zarr", x, labels, classes=[f"k{i}" for i in range(7)]),
        "views": write_bank(tmp_path / "v.zarr", x, labels, views_attr={"policy": "rrc", "num_views": 1, "seed": 3}),
        "num_views": write_bank(tmp_path / "v2.zarr", np.zeros((150, 1, 2, 7), np.float32), labels),
    }
    for field, other in cases.items():
        _refused(capsys, ["ensemble", str(a), str(other), "-o", out], f"'{field}'", str(other))
    inc = write_bank(tmp_path / "inc.zarr", x, labels, complete=False)
    _refused(capsys, ["ensemble", str(a), str(inc), "-o", out], "incomplete")
    _refused(capsys, ["ensemble", str(a), str(tmp_path / "missing.zarr"), "-o", out], "not found")
    _refused(capsys, ["ensemble", str(a), str(a), "-o", out, "--mode", "median"], "median", "mean-logits")
    _refused(capsys, ["ensemble", str(a), "-o", out, "--scheduler", "bogus"], "bogus")
    _refused(capsys, ["ensemble", str(a), "-o", str(tmp_path / "nodir" / "o.zarr")], "does not exist")
    assert not Path(out).exists()
    # refuses to overwrite without --overwrite; replaces with it
    assert main(["ensemble", str(a), str(a), "-o", out, "--no-progress"]) == 0
    before = LabelBank(out).attrs["created"]
    _refused(capsys, ["ensemble", str(a), "-o", out, "--mode", "stack"], "already exists", "--overwrite")
    assert LabelBank(out).attrs["created"] == before
    assert main(["ensemble", str(a), "-o", out, "--mode", "stack", "--overwrite", "--no-progress"]) == 0
    assert LabelBank(out).attrs["ensemble"]["mode"] == "stack" and verify_bank(out) == []
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []


def test_ensemble_atomic_on_corrupt_input(tmp_path: Path, capsys) -> None:
    """A corrupt input chunk fails the job midway: no bank under the final name, no temporary left behind."""
    a, _, _ = synth_bank(tmp_path / "a.zarr")
    b, _, _ = synth_bank(tmp_path / "b.zarr", seed=1)
    corrupt_chunk(b, "logits", "3/0/0/0")
    out = tmp_path / "o.zarr"
    err = _refused(capsys, ["ensemble", str(a), str(b), "-o", str(out), "--no-progress"], "nothing written")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("o.zarr")] == []
    # an existing output survives a failed --overwrite untouched
    assert main(["ensemble", str(a), "-o", str(out), "--no-progress"]) == 0
    created = LabelBank(out).attrs["created"]
    _refused(capsys, ["ensemble", str(a), str(b), "-o", str(out), "--overwrite", "--no-progress"], "nothing written")
    assert LabelBank(out).attrs["created"] == created and verify_bank(out) == []
    assert "Checksum" in err or "checksum" in err.lower() or "crc" in err.lower() or "Error" in err


def test_ensemble_on_dask_distributed_cluster(tmp_path: Path, capsys) -> None:
    """`--scheduler tcp://…` against a LocalCluster (in-process workers over real TCP: processes=False keeps the
    test fast; the 2-process `--scheduler local-cluster` path has its own slow-marked test)."""
    distributed = pytest.importorskip("distributed")
    a, b, x, _, skipped = _two(tmp_path)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                                  dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        out = tmp_path / "cluster.zarr"
        assert main(["ensemble", str(a), str(b), "-o", str(out), "--mode", "mean-probs", "--scheduler",
                     cluster.scheduler_address, "--no-progress"]) == 0
        # a failing job on the cluster leaves nothing behind either
        bad, _, _ = synth_bank(tmp_path / "bad.zarr", seed=3)
        corrupt_chunk(bad, "logits", "1/0/0/0")
        assert main(["ensemble", str(a), str(bad), "-o", str(tmp_path / "f.zarr"), "--scheduler",
                     cluster.scheduler_address, "--no-progress"]) == 2
        assert "nothing written" in capsys.readouterr().err
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("f.zarr")] == []
    ref = tmp_path / "threads.zarr"
    assert main(["ensemble", str(a), str(b), "-o", str(ref), "--mode", "mean-probs", "--no-progress"]) == 0
    g1, g2 = LabelBank(out).read_logits(), LabelBank(ref).read_logits()
    np.testing.assert_array_equal(np.nan_to_num(g1, nan=7.0), np.nan_to_num(g2, nan=7.0))
    assert verify_bank(out) == []
    assert json.dumps(LabelBank(out).attrs["metrics"]) == json.dumps(LabelBank(ref).attrs["metrics"])


@pytest.mark.slow
def test_ensemble_local_cluster_processes(tmp_path: Path) -> None:
    """`--scheduler local-cluster`: 2 worker processes (spawned; the tests' __main__ is guarded by pytest)."""
    a, b, x, _, skipped = _two(tmp_path)
    out = tmp_path / "lc.zarr"
    assert main(["ensemble", str(a), str(b), "-o", str(out), "--scheduler", "local-cluster", "--no-progress"]) == 0
    got = LabelBank(out).read_logits()
    np.testing.assert_allclose(got[~skipped], x.mean(1, keepdims=True)[~skipped], rtol=2e-3, atol=2e-3)
    assert verify_bank(out) == []
