"""Compact on write (issue 16): ``dump_logits --format topk --topk K`` / ``--format int8`` write the compact
arrays directly, chunk by chunk, equal bit for bit to ``labels compact`` of the dense dump of the same teacher,
with the dense dump's resume, --skip-corrupt and refusal guarantees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.bank.writer import done_flags
from pipeline.dump_logits import main
from pipeline.labels import bank_info
from pipeline.labels import main as labels_main
from s1_helpers import kill_dump_after_chunks

REPO = Path(__file__).resolve().parents[2]
TOPK_ARRAYS = ("topk_values", "topk_indices", "target_logprob", "tail_lse")
SAMPLED_ARRAYS = TOPK_ARRAYS + ("sample_indices", "sample_logprob", "logsumexp")
FIDELITY_KEYS = {f"{s}_t{t}" for s in ("kl", "tv", "tail", "tail_dense") for t in (1, 2, 4)} | {"top1_agreement",
                                                                                              "vectors"}
ROW_ARRAYS = ("labels", "views", "skipped", "done", "chunk_sums")


def _read(bank: Path, names) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(bank), mode="r")
    return {n: np.asarray(g[n][:]) for n in names}


def _assert_same_arrays(a: Path, b: Path, names) -> None:
    ra, rb = _read(a, names), _read(b, names)
    for n in names:
        x, y = ra[n], rb[n]
        assert x.dtype == y.dtype and x.shape == y.shape, n
        assert x.tobytes() == y.tobytes(), n  # bit for bit (NaN payloads included)


@pytest.fixture(scope="module")
def ensemble_views(demo_root: Path, make_ckpt, tmp_path_factory) -> dict:
    """Dense, top-3 and int8 dumps of a 2-teacher ensemble (peaked checkpoints) with 2 rrc+flip views each."""
    d = tmp_path_factory.mktemp("cdump")
    (c1, _), (c2, _) = make_ckpt(num_classes=10, seed=1), make_ckpt(num_classes=10, seed=2)
    base = ["--teacher", "democnn_s", "--weights", str(c1), "--teacher", "democnn_s", "--weights", str(c2),
            "--data", str(demo_root), "--preset", "demo", "--batch-size", "32", "--rows-per-chunk", "64",
            "--views", "2", "--view-policy", "rrc+flip", "--workers", "1"]
    out = {"base": base}
    for name, extra in (("dense", []), ("topk", ["--format", "topk", "--topk", "3"]), ("int8", ["--format", "int8"]),
                        ("sampled", ["--format", "sampled", "--topk", "2", "--samples", "3", "--sample-seed", "7"])):
        out[name] = d / f"{name}.zarr"
        assert main(base + extra + ["--out", str(out[name])]) == 0
    return out


@pytest.mark.parametrize("fmt", ["topk", "int8", "sampled"])
def test_compact_on_write_equals_labels_compact_of_the_dense_dump(ensemble_views: dict, tmp_path: Path, fmt: str):
    dense, direct = ensemble_views["dense"], ensemble_views[fmt]
    bank = LabelBank(direct)
    assert bank.complete and bank.format == fmt and bank.shape == (300, 2, 2, 10)
    assert "logits" not in bank.group  # no dense array is ever written
    assert verify_bank(direct) == []
    out = tmp_path / "compacted.zarr"
    extra = {"topk": ["--topk", "3"], "int8": [], "sampled": ["--topk", "2", "--samples", "3", "--sample-seed", "7"]}
    assert labels_main(["compact", str(dense), "-o", str(out), "--format", fmt, *extra[fmt], "--no-progress"]) == 0
    names = {"topk": TOPK_ARRAYS, "int8": ("q", "scale"), "sampled": SAMPLED_ARRAYS}[fmt] + ROW_ARRAYS
    _assert_same_arrays(direct, out, names)  # payload, rows and the per-chunk fidelity/metric sums
    a, b = bank.attrs, LabelBank(out).attrs
    assert a["fidelity"] == b["fidelity"] and a["metrics"] == b["metrics"]
    assert a["compact_arrays"] == b["compact_arrays"] and a.get("tail") == b.get("tail")
    assert set(a["fidelity"]) == (FIDELITY_KEYS - ({"kl_t1", "kl_t2", "kl_t4"} if fmt == "sampled" else set()))
    assert a["fidelity"]["vectors"] == 300 * 2 * 2 and a["fidelity"]["top1_agreement"] == 1.0
    assert a.get("samples") == (3 if fmt == "sampled" else None) and a.get("sample_seed") == (7 if fmt == "sampled" else None)
    # the teachers' own metrics, measured before encoding, are those of the dense dump
    for name, m in LabelBank(dense).attrs["metrics"].items():
        for k in ("top1", "top5", "ece", "nll"):
            assert a["source_metrics"][name][k] == pytest.approx(m[k], abs=1e-4), (name, k)
    # and the reconstruction is the dense dump's logits up to the format's loss
    x, y = LabelBank(dense).read_logits(), bank.read_logits()
    assert np.array_equal(x.argmax(-1), y.argmax(-1))
    assert a["key"] != LabelBank(dense).attrs["key"]


def test_a_compact_format_larger_than_dense_is_said(caplog):
    """Top-k or sampled vectors that take more bytes than dense fp16 (few classes, large K or S) are accepted with a
    warning naming both sizes; a format smaller than dense says nothing."""
    from pipeline.bank.compact import check_format_args

    with caplog.at_level("WARNING"):
        check_format_args("sampled", 2, 100, 10)  # 100 draws from 10 classes
        check_format_args("topk", 10, None, 1000)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "--samples 100 stores" in said[0] and "more than a dense fp16 vector of 10 classes (20 B)" \
        in said[0], said


def test_sampled_fidelity_says_it_is_one_draw():
    """A sampled bank stores no uniform tail (the sampled classes carry the teacher's) and its figures are of one
    draw: the line says so instead of printing "tail 0" beside the teacher's share."""
    from pipeline.bank.compact import format_fidelity

    f = {"tv_t1": 0.2, "tail_t1": 0.0, "tail_dense_t1": 0.44, "top1_agreement": 0.5, "vectors": 10}
    line = format_fidelity(f, "sampled")
    assert "teacher's tail 0.44 carried by the sampled classes" in line and "tail 0 " not in line
    assert "top-1 agreement 0.5000 of one draw" in line
    assert "tail 0 (teacher 0.44)" in format_fidelity(f, "topk")


def test_info_reports_fidelity_at_recipe_temperatures(ensemble_views: dict, capsys):
    assert labels_main(["info", str(ensemble_views["topk"])]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("fidelity"))
    assert "T=1: KL" in line and "T=2: KL" in line and "T=4: KL" in line and "top-1 agreement 1.0000" in line
    assert "tail" in line and "(teacher" in line
    assert "top 3 + true class, tail stats" in out
    info = bank_info(str(ensemble_views["topk"]))
    f = info["fidelity"]
    kls = [f["kl_t1"], f["kl_t2"], f["kl_t4"]]  # measured per temperature (not one figure copied three times)
    assert all(0 < k < 10 for k in kls) and len(set(kls)) == 3
    assert info["compact"]["raw_bytes_per_vector"] == 3 * 4 + 2 + 2 * 6


def test_true_class_log_probability_is_exact_outside_the_top_k(ensemble_views: dict):
    dense, topk = LabelBank(ensemble_views["dense"]), LabelBank(ensemble_views["topk"])
    x = dense.read_logits().astype(np.float32)
    labels = dense.labels()
    lp = x - x.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lab = labels[:, None, None, None]
    true_lp = np.take_along_axis(lp, np.broadcast_to(lab, lp.shape[:-1] + (1,)), -1)[..., 0]
    rank = (lp > true_lp[..., None]).sum(-1)
    outside = rank >= 3
    assert outside.sum() > 20, "the fixture must have true classes outside the top 3"
    got = topk.read_logits()
    got_true = np.take_along_axis(got, np.broadcast_to(lab, got.shape[:-1] + (1,)), -1)[..., 0]
    stored = np.asarray(topk.group["target_logprob"][:])
    assert np.array_equal(got_true, stored.astype(np.float32))  # reconstructed exactly as stored
    np.testing.assert_allclose(got_true[outside], true_lp[outside], rtol=1e-3, atol=1e-3)  # = teacher, fp16


def test_format_refusals_one_line_and_no_bank(demo_root: Path, tmp_path: Path, capsys):
    base = ["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset", "demo"]
    cases = [(["--format", "topk"], "--topk"), (["--topk", "3"], "--format topk"),
             (["--format", "int8", "--topk", "3"], "--topk"), (["--format", "topk", "--topk", "0"], "out of range"),
             (["--format", "topk", "--topk", "11"], "<= 10"), (["--format", "zip"], "dense, topk, int8")]
    for k, (extra, word) in enumerate(cases):
        out = tmp_path / f"b{k}.zarr"
        assert main(base + extra + ["--out", str(out)]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and word in err, (extra, err)
        assert not out.exists()


def test_default_path_and_key_of_a_compact_dump(demo_root: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    base = ["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset", "demo",
            "--rows-per-chunk", "128", "--batch-size", "64"]
    paths = {}
    for fmt, extra in (("dense", []), ("topk", ["--format", "topk", "--topk", "4"]), ("int8", ["--format", "int8"])):
        assert main(base + extra) == 0
        paths[fmt] = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert paths["topk"].name.endswith("-top4.zarr") and paths["int8"].name.endswith("-int8.zarr")
    assert paths["dense"].name.count("-") == 1  # <teacher>-<key8>.zarr, as before compact dumps existed
    keys = {f: LabelBank(p).attrs["key"] for f, p in paths.items()}
    assert len(set(keys.values())) == 3
    assert main(base + ["--format", "topk", "--topk", "4"]) == 0  # same command again: a no-op
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(paths["topk"])


@pytest.mark.parametrize("fmt", ["topk", "sampled"])
def test_sigkill_then_resume_of_a_compact_dump_is_bit_identical(demo_root: Path, tmp_path: Path, capsys, fmt: str):
    """A killed dump resumed is bit for bit an uninterrupted one; for ``sampled`` the draws too (seeded by row)."""
    extra = ["--topk", "2"] + (["--samples", "4", "--sample-seed", "3"] if fmt == "sampled" else [])
    args = lambda out: ["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset",  # noqa: E731
                        "demo", "--rows-per-chunk", "16", "--batch-size", "8", "--workers", "1", "--views", "2",
                        "--view-policy", "rrc", "--format", fmt, *extra, "--out", str(out)]
    killed = tmp_path / "killed.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    rc = kill_dump_after_chunks(args(killed), killed, env)
    assert rc == -signal.SIGKILL, "the dump finished before it could be killed"
    g = zarr.open_group(str(killed), mode="r")
    done = done_flags(g)
    assert 2 <= done.sum() < 19 and dict(g.attrs)["complete"] is False
    assert main(args(killed)) == 0
    assert capsys.readouterr().out.strip() == str(killed)
    clean = tmp_path / "clean.zarr"
    assert main(args(clean)) == 0
    _assert_same_arrays(killed, clean, (SAMPLED_ARRAYS if fmt == "sampled" else TOPK_ARRAYS) + ROW_ARRAYS)
    a, b = LabelBank(killed).attrs, LabelBank(clean).attrs
    assert a["fidelity"] == b["fidelity"] and a["metrics"] == b["metrics"] and a["key"] == b["key"]


def test_skip_corrupt_with_a_compact_dump(image_tree: Path, tmp_path: Path, capsys):
    from pipeline.data import build_manifest

    m = build_manifest(image_tree, "train")
    bad = m.files.index("train/mango/img_3.jpg")
    (image_tree / m.files[bad]).write_bytes(b"")
    base = ["--teacher", "democnn_s", "--weights", "none", "--data", str(image_tree), "--preset", "tiny",
            "--rows-per-chunk", "4", "--batch-size", "4", "--workers", "1", "--skip-corrupt"]
    dense, topk = tmp_path / "d.zarr", tmp_path / "k.zarr"
    assert main(base + ["--out", str(dense)]) == 0
    assert main(base + ["--format", "topk", "--topk", "2", "--out", str(topk)]) == 0
    capsys.readouterr()
    bank = LabelBank(topk)
    assert np.flatnonzero(bank.skipped()).tolist() == [bad] and verify_bank(topk) == []
    x = bank.read_logits()
    assert np.isnan(x[bad]).all() and np.isfinite(np.delete(x, bad, axis=0)).all()
    assert bank.attrs["fidelity"]["vectors"] == len(m) - 1
    assert bank.attrs["metrics"]["0:democnn_s"]["n"] == len(m) - 1
    out = tmp_path / "c.zarr"
    assert labels_main(["compact", str(dense), "-o", str(out), "--topk", "2", "--no-progress"]) == 0
    _assert_same_arrays(topk, out, TOPK_ARRAYS + ROW_ARRAYS)


def test_torchrun_two_ranks_compact_dump_equals_single_process(demo_root: Path, tmp_path: Path):
    """Each rank encodes and writes its own chunks (payload, sums, done flag); rank 0 sums the chunks' sums."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = lambda out: ["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset",  # noqa: E731
                        "demo", "--rows-per-chunk", "32", "--batch-size", "16", "--workers", "1", "--format", "int8",
                        "--out", out]
    url = (tmp_path / "dist.zarr").as_uri()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                        "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "pipeline.dump_logits",
                        *args(url), "-v"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 dumped 160 samples" in r.stdout + r.stderr and "rank 1 dumped 140 samples" in r.stdout + r.stderr
    single = tmp_path / "single.zarr"
    assert main(args(str(single))) == 0
    _assert_same_arrays(tmp_path / "dist.zarr", single, ("q", "scale") + ROW_ARRAYS)
    a, b = LabelBank(url).attrs, LabelBank(single).attrs
    assert a["fidelity"] == b["fidelity"] and a["metrics"] == b["metrics"] and a["complete"] is True
