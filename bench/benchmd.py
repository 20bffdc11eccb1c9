"""Shared by the bench scripts: rewrite one script's own section of BENCHMARKS.md, leaving the others alone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_section(title: str, body: str, path: Path = REPO / "BENCHMARKS.md") -> None:
    """Replace section ``## title`` of ``path`` (or append it); it ends at the next heading or ``<!--`` marker."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nFigures measured by the scripts in `bench/`.\n"
    block = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |^<!-- |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)
