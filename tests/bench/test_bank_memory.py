"""Issue 21, point 4, on CPU with gloo: under a 2-process torchrun a bank held on the host is one copy per node
(local rank 0 decompresses it into a file both processes map), rows gathered from it are the bank's, nothing is
left in the share folder, and the node's proportional memory for the bank grows by far less than a second copy
(bench/bank_memory.py measures it; BENCHMARKS.md records the full-size figures)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def test_two_processes_share_one_copy_of_a_bank(tmp_path, monkeypatch):
    import bank_memory
    from bank_scale import write_bank

    bank = tmp_path / "bank.zarr"
    write_bank(bank, 30000, 1, 1, 1000, "dense", None, 4096, progress=False)  # 60 MB resident
    share = tmp_path / "share"
    share.mkdir()
    monkeypatch.setenv("KD_SHARE_DIR", str(share))
    one = bank_memory.measure(bank, 1, True)
    two = bank_memory.measure(bank, 2, True)
    private = bank_memory.measure(bank, 2, False)
    assert all(r["exact"] for r in one + two + private)
    assert [r["shared"] for r in two] == [True, True] and not one[0]["shared"] and not private[0]["shared"]
    assert list(share.iterdir()) == []  # the shared files are removed once both processes mapped them
    added = {name: sum(r["after"] - r["before"] for r in rows) for name, rows in
             (("one", one), ("two", two), ("private", private))}
    nbytes = one[0]["nbytes"]
    assert added["private"] - added["one"] > 0.8 * nbytes  # a second private copy costs a whole bank...
    assert added["two"] - added["one"] < 0.5 * nbytes  # ...a second process sharing the copy does not
