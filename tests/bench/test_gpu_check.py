"""bench/gpu_check.py on CPU at toy sizes (issue 13): the GPU check script runs its whole flow here too, so it
never rots between the rare sessions that have a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path: Path, capsys):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    rc = gpu_check.main(["--device", "cpu", "--size", "small", "--loader", "torch", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert rc == 0, out[-3000:]
    statuses = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in table}
    assert statuses["stage 1 on cpu == on cpu"] == "PASS" and statuses["bank == live teacher"] == "PASS"
    assert statuses["torchrun, 1 process, both stages"] == "PASS"
    assert statuses["DALI mixed decode"] == "n/a" and len(statuses) == 12
    assert statuses["stage 2 with the bank on the host (staging)"] == "PASS"
    assert statuses["torch nvJPEG decode"] == statuses["torch nvJPEG vs CPU torch path"] == "n/a"
    assert statuses["teacher only: ResNet-50 bf16"] == "n/a"
    assert "fp16+GradScaler n/a on cpu" in out and "bank_over_ce" in out


@pytest.mark.slow
def test_a_failing_check_leaves_the_others_running(tmp_path: Path):
    """Each check makes what it needs: with the check that used to make the training bank failing (and no data
    generated beforehand), the checks that read the bank still run and pass, each in its own row."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    check = gpu_check.Check("cpu", gpu_check.SIZES["small"], tmp_path, "torch")
    checks = check.checks("cpu")
    check.run("stage 1 rate", gpu_check._injected)
    for name in ("bank == live teacher", "stage 2 with the bank on the host (staging)"):
        check.run(name, checks[name])
    rows = {r.check: r for r in check.rows}
    assert rows["stage 1 rate"].status == "FAIL" and "injected" in rows["stage 1 rate"].detail
    assert rows["bank == live teacher"].status == "PASS", rows["bank == live teacher"].detail
    assert rows["stage 2 with the bank on the host (staging)"].status == "PASS"
