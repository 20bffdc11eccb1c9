"""The whole pipeline where NVIDIA DALI cannot be imported (issue 13): a clean interpreter hides ``nvidia.dali``
from import, then dumps a center bank and a 2-view bank, trains from each (replaying the views), reports, and
checks that ``--loader dali`` is a one-line error naming ``--loader torch``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_DRIVER = r"""
import importlib.abc, io, json, sys, contextlib
class HideDali(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, HideDali())
data, work = sys.argv[1], sys.argv[2]
from pipeline.dump_logits import main as dump
from pipeline.train_student import main as train
from pipeline.report import main as report
common = ["--data", data, "--split", "train", "--preset", "demo", "--batch-size", "64", "--workers", "1"]
rc = {}
rc["dump"] = dump(["--teacher", "democnn_s", "--weights", "none", *common, "--out", work + "/c.zarr"])
rc["dump_views"] = dump(["--teacher", "democnn_s", "--weights", "none", *common, "--views", "2",
                         "--view-policy", "rrc+flip", "--out", work + "/v.zarr"])
run = ["--student", "democnn_s", "--data", data, "--preset", "demo", "--batch-size", "32", "--epochs", "1",
       "--workers", "1", "max_steps_per_epoch=3"]
rc["train"] = train(["--method", "kd", *run, "--labels", work + "/c.zarr", "--output-dir", work + "/r1"])
rc["replay"] = train(["--method", "wsld", *run, "--labels", work + "/v.zarr", "--replay-views",
                      "--output-dir", work + "/r2"])
rc["report"] = report([work + "/r1", work + "/r2"])
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc["dali"] = dump(["--teacher", "democnn_s", "--weights", "none", *common, "--loader", "dali",
                       "--out", work + "/x.zarr"])
import zarr
print("RESULT" + json.dumps({"rc": rc, "dali_err": err.getvalue(),
      "loaded": sorted(m for m in sys.modules if m.startswith("nvidia.dali")),
      "loader": zarr.open_group(work + "/c.zarr", mode="r").attrs["loader"]}))
"""


def test_pipeline_runs_without_dali(demo_root: Path, tmp_path: Path):
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(demo_root), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                             "OMP_NUM_THREADS": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    res = json.loads(line[0][len("RESULT"):])
    assert res["rc"] == {"dump": 0, "dump_views": 0, "train": 0, "replay": 0, "report": 0, "dali": 2}, res
    assert res["loaded"] == [] and res["loader"] == "torch"
    msg = res["dali_err"].strip()
    assert msg.startswith("error:") and "--loader torch" in msg and "\n" not in msg
    assert json.loads((tmp_path / "r2" / "final.json").read_text())["bank"].endswith("v.zarr")
    assert yaml_loader(tmp_path / "r1") == "torch"


def yaml_loader(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["loader"]
