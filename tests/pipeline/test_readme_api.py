"""The README's Python API section runs as written (on the demo bank and data)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_python_api_runs(demo_root: Path, demo_bank: Path):
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('BANK = "path/to/bank.zarr"', f"BANK = {str(demo_bank)!r}")
    code = code.replace('DATA = "data/fashion-mnist"', f"DATA = {str(demo_root)!r}")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert tuple(scope["teacher_logits"].shape) == (3, 1, 10)
    assert scope["probs"].sum(-1).allclose(scope["probs"].new_ones(3))
