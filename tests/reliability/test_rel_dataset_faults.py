"""Fault 5: bad files in the dataset.

- PNG (RGB, RGBA, palette), grayscale and CMYK JPEGs and a PNG named ``.jpg`` mixed into a JPEG tree decode to
  the right RGB: DALI's decoded pixels equal PIL's ``convert("RGB")``, the CMYK one matches the RGB it was made
  from, and the teacher's logits of each equal those of a lossless RGB re-save of the same image.
- An unreadable file (permissions) -> exit 2 naming the file, or a recorded skip with ``--skip-corrupt``; an
  unreadable class folder -> exit 2 naming it. Root reads anything, so these run in a child process whose
  capability bounding set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (``setpriv``): file modes apply.

Zero-byte, truncated and text-as-.jpg files: tests/stage1_teacher_logits/test_dump.py::test_corrupt_image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.bank.reader import LabelBank, verify_bank
from pipeline.data import build_manifest
from pipeline.dump_logits import main
from rel_helpers import REPO, env


def _base_rgb(h: int = 44, w: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = (x * 255 // (w - 1)).astype(np.uint8)
    arr[..., 1] = (255 - y * 255 // (h - 1)).astype(np.uint8)
    arr[8:30, 10:40, 2] = 210
    return arr


def _mixed_tree(root: Path) -> dict[str, str]:
    """``train/{mixed,refs}``: special files and, for each, a lossless RGB PNG re-save (PIL's reading of it)."""
    arr = _base_rgb()
    rgb = Image.fromarray(arr)
    mixed, refs = root / "train" / "mixed", root / "train" / "refs"
    mixed.mkdir(parents=True)
    refs.mkdir(parents=True)
    rgb.save(mixed / "rgb.jpg", quality=95)
    rgb.convert("CMYK").save(mixed / "cmyk.jpg", quality=95)
    rgb.convert("L").save(mixed / "gray.jpg", quality=95)
    rgb.save(mixed / "rgb.png")
    rgb.convert("RGBA").save(mixed / "rgba.png")
    rgb.convert("P").save(mixed / "palette.png")
    rgb.save(mixed / "png_named.jpg", format="PNG")  # ImageNet has one of these
    pairs = {}
    for f in sorted(mixed.iterdir()):
        with Image.open(f) as im:
            im.convert("RGB").save(refs / f"ref_{f.stem}.png")
        pairs[f"train/mixed/{f.name}"] = f"train/refs/ref_{f.stem}.png"
    assert Image.open(mixed / "cmyk.jpg").mode == "CMYK" and Image.open(mixed / "gray.jpg").mode == "L"
    return pairs


def _dali_decode(root: Path, files: list[str]) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        jpegs, _ = fn.readers.file(file_root=str(root), files=files, labels=list(range(len(files))))
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

    p = pipe(batch_size=len(files), num_threads=1, device_id=None)
    p.build()
    (out,) = p.run()
    return [np.array(out[k]) for k in range(len(files))]


def test_mixed_formats_decode_to_the_right_rgb(tmp_path: Path, capsys):
    root = tmp_path / "mixed"
    pairs = _mixed_tree(root)
    files = list(pairs)
    decoded = dict(zip(files, _dali_decode(root, files)))
    for f, img in decoded.items():
        with Image.open(root / f) as im:
            pil = np.asarray(im.convert("RGB"))
        assert img.shape == pil.shape, f
        assert np.abs(img.astype(int) - pil).max() <= 1, f  # same decoder family: identical up to rounding
    # CMYK: PIL-independent truth, the RGB it was made from (JPEG q95 tolerance)
    cmyk = decoded["train/mixed/cmyk.jpg"].astype(int)
    assert np.abs(cmyk - _base_rgb()).mean() < 3, "CMYK JPEG decoded to the wrong colours"
    gray = decoded["train/mixed/gray.jpg"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()

    out = tmp_path / "bank.zarr"
    assert main(["--teacher", "democnn_s", "--weights", "none", "--data", str(root), "--split", "train",
                 "--preset", "demo", "--batch-size", "4", "--rows-per-chunk", "4", "--workers", "1",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    bank = LabelBank(out)
    m = build_manifest(root, "train")
    logits = bank.read_logits().astype(np.float32)
    assert np.isfinite(logits).all() and not bank.skipped().any()
    for f, ref in pairs.items():
        i, j = m.files.index(f), m.files.index(ref)
        np.testing.assert_allclose(logits[i], logits[j], rtol=0, atol=1e-3, err_msg=f)


# --- unreadable files and folders (permissions) -----------------------------------------------------------------

_CHILD = r"""
import contextlib, io, json, sys
from pipeline.dump_logits import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException as e:  # what a traceback would have been
            rc = f"{type(e).__name__}: {e}"
    results.append({"rc": rc, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def _run_without_dac(argvs: list[list[str]]) -> list[dict]:
    """Run dumps in a child whose capability bounding set lacks the DAC overrides (so root obeys file modes)."""
    if os.geteuid() != 0:  # an ordinary user obeys file modes already
        prefix: list[str] = []
    elif shutil.which("setpriv"):
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                  "-dac_override,-dac_read_search"]
    else:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    probe = subprocess.run([*prefix, "cat", "/proc/self/status"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.strip()}")
    r = subprocess.run([*prefix, sys.executable, "-c", _CHILD, json.dumps(argvs)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("error:")]


def test_unreadable_file_and_folder(image_tree: Path, tmp_path: Path):
    m = build_manifest(image_tree, "train")
    bad_index = m.files.index("train/mango/img_3.jpg")
    bad = image_tree / m.files[bad_index]
    folder_tree = tmp_path / "tree2"
    shutil.copytree(image_tree, folder_tree)
    (folder_tree / "train" / "apple").chmod(0o000)
    bad.chmod(0o000)
    try:
        out, out2 = tmp_path / "bank.zarr", tmp_path / "bank2.zarr"
        base = ["--teacher", "democnn_s", "--weights", "none", "--split", "train", "--preset", "tiny",
                "--batch-size", "2", "--rows-per-chunk", "2", "--workers", "1"]
        res = _run_without_dac([
            base + ["--data", str(image_tree), "--out", str(out)],
            base + ["--data", str(image_tree), "--out", str(out), "--skip-corrupt"],
            base + ["--data", str(folder_tree), "--out", str(out2)],
        ])
    finally:
        bad.chmod(0o644)
        (folder_tree / "train" / "apple").chmod(0o755)
    # 1. the unreadable file is named, exit 2, one line, no traceback
    assert res[0]["rc"] == 2, res[0]
    errs = _errors(res[0]["stderr"])
    assert len(errs) == 1 and str(bad) in errs[0] and "--skip-corrupt" in errs[0], res[0]["stderr"][-2000:]
    # 2. --skip-corrupt: recorded as skipped, the bank completes
    assert res[1]["rc"] == 0, res[1]["stderr"][-2000:]
    bank = LabelBank(out)
    assert bank.complete and np.flatnonzero(bank.skipped()).tolist() == [bad_index]
    assert verify_bank(out) == []
    # 3. an unreadable class folder is named, exit 2, nothing written
    assert res[2]["rc"] == 2, res[2]
    errs = _errors(res[2]["stderr"])
    assert len(errs) == 1 and str(folder_tree / "train" / "apple") in errs[0] and "Permission denied" in errs[0], errs
    assert "Traceback" not in res[2]["stderr"] and not out2.exists()
