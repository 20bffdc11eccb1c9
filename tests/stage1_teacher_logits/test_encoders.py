"""The format registry of stage 1: the producer encodes through whatever encoder is registered for the bank's
format (a new format plugs in without editing the loop), and an unregistered format is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.dump_logits import main
from stage1_teacher_logits import encoders


def test_unregistered_format_is_refused():
    with pytest.raises(ValueError, match="no stage-1 encoder registered for format 'nosuchformat'"):
        encoders.encoder_for({"format": "nosuchformat", "dtype": "float16", "shape": [1, 1, 1, 1]})


def test_every_bank_format_has_an_encoder():
    from pipeline.bank.schema import FORMATS

    assert set(FORMATS) <= set(encoders._ENCODERS)


def test_the_dump_encodes_through_the_registered_encoder(demo_root: Path, tmp_path: Path, monkeypatch):
    calls = {"rows": 0, "finish": 0}

    class Counting(encoders.DenseEncoder):
        def encode(self, x, labels, skipped, rows, fidelity):
            assert x.ndim == 4 and len(rows) == len(x) == len(labels) == len(skipped) == len(fidelity)
            calls["rows"] += len(rows)
            out = super().encode(x, labels, skipped, rows, fidelity)
            out["logits"] = out["logits"] * 0 + 1  # visible in the bank
            return out

        def finish(self, records, labels):
            calls["finish"] += 1
            assert set(records) == {"logits", "_metrics"} and len(records["logits"]) == len(labels) <= 128
            return super().finish(records, labels)

    monkeypatch.setitem(encoders._ENCODERS, "dense", Counting)
    out = tmp_path / "bank.zarr"
    assert main(["--teacher", "democnn_s", "--weights", "none", "--data", str(demo_root), "--preset", "demo",
                 "--batch-size", "32", "--rows-per-chunk", "128", "--workers", "1", "--out", str(out)]) == 0
    g = zarr.open_group(str(out), mode="r")
    n = g["labels"].shape[0]
    assert calls == {"rows": n, "finish": -(-n // 128)}
    assert (np.asarray(g["logits"][:]) == 1).all()


@pytest.mark.parametrize("map_dtype,k", [("float16", None), ("int8", None), ("float16", 3)])
def test_labelmap_encoder_per_batch_equals_the_chunk_encoding(map_dtype, k):
    """The map encoder runs per batch; each cell is encoded on its own, so the batches concatenated are the bytes
    of pipeline.bank.labelmap.encode_chunk over the whole chunk (what main's writer stored), skipped rows included."""
    import torch

    from pipeline.bank.labelmap import encode_chunk

    attrs = {"format": "labelmap", "dtype": "float16", "shape": [10, 2, 1, 7],
             "label_map": {"size": 3, "region": "eval", "map_dtype": map_dtype, "topk": k}}
    enc = encoders.encoder_for(attrs)
    x = torch.randn(10, 2, 9, 7, generator=torch.Generator().manual_seed(0)) * 5
    skipped = torch.zeros(10, dtype=torch.bool)
    skipped[4] = True
    parts = [enc.encode(x[s:s + 4], torch.zeros(len(x[s:s + 4]), dtype=torch.long), skipped[s:s + 4],
                        np.arange(s, min(10, s + 4)), torch.zeros(len(x[s:s + 4]), dtype=torch.bool))
             for s in range(0, 10, 4)]
    rounded = x.half().masked_fill(skipped[:, None, None, None], float("nan")).numpy()
    want = encode_chunk(rounded, skipped.numpy(), 3, map_dtype, k)
    assert enc.finish({}, np.zeros(0, np.int32)) == {}
    for name, a in want.items():
        got = np.concatenate([p[name].numpy() for p in parts])
        assert got.dtype == a.dtype and np.array_equal(got, a, equal_nan=True), name


def test_dense_metrics_come_from_the_dump_and_equal_a_read_back(demo_root: Path, tmp_path: Path, capsys):
    """A dense dump measures its teachers' metrics on the device as it goes (per-chunk ``metric_sums``, issue 24):
    the ``metrics`` attr equals a read-back of the stored logits (each teacher and the ensemble), with chunks of
    several batches and a short last chunk; a bank whose metric states lost a chunk fails ``labels verify``."""
    import shutil

    from pipeline.bank.reader import verify_bank
    from stage1_teacher_logits.dump import teacher_metrics

    out = tmp_path / "bank.zarr"
    args = ["--teacher", "democnn_s", "--teacher", "democnn", "--weights", "none", "--weights", "none",
            "--data", str(demo_root), "--preset", "demo", "--batch-size", "24", "--rows-per-chunk", "64",
            "--workers", "1", "--out", str(out)]
    assert main(args) == 0
    g = zarr.open_group(str(out), mode="r")
    assert g.attrs["metric_sums"] is True and g["metric_sums"].shape == (-(-g["labels"].shape[0] // 64), 3 * 49)
    got = g.attrs["metrics"]
    want = teacher_metrics(g, list(g.attrs["teachers"]))
    assert set(got) == set(want) == {"0:democnn_s", "1:democnn", "ensemble"}
    for name in want:
        assert got[name]["n"] == want[name]["n"] == g["labels"].shape[0]
        for k in want[name]:
            assert got[name][k] == pytest.approx(want[name][k], abs=2e-6), (name, k)
    assert verify_bank(out) == []
    shutil.rmtree(out / "metric_sums" / "c" / "1")
    assert any("'metric_sums' chunk 1" in p for p in verify_bank(out))
    # a dump that finds every chunk done but a chunk's metric states missing stops in one line
    zarr.open_group(str(out), mode="r+").attrs["complete"] = False
    capsys.readouterr()
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "'metric_sums' has no value for chunks [1]" in err[0]
