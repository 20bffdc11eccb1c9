"""``python -m pipeline.report runs/*`` (or ``runs/demo``, a folder of runs): a comparison table of finished runs
(method, student, teacher, every bank the run read, preset, amp, epochs, top-1, top-5, ECE, NLL, teacher-student
top-1 agreement (%) and KL(teacher ‖ student) at T = 1 on val (n/a without a teacher or a val bank of it),
training time).

A path that is not a run itself (no ``final.json``) but holds runs one level down stands for those runs
(``make demo`` writes ``runs/demo/<run>``). Runs that reused one bank line up side by side. Numbers have one format per column (accuracies in percent with 2
decimals, ECE and NLL with 4, seconds with 2). ``--markdown`` prints a Markdown table; ``--json`` the rows.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from pipeline.errors import CliParser, UsageError, cli_entry

COLUMNS = ("run", "method", "student", "teacher", "bank", "preset", "amp", "epochs", "top1", "top5", "ece", "nll",
           "agree", "kl", "time_s")
# one number format per column, whatever the magnitude
FORMATS = {"top1": "{:.2f}", "top5": "{:.2f}", "ece": "{:.4f}", "nll": "{:.4f}", "agree": "{:.2f}", "kl": "{:.4f}",
           "time_s": "{:.2f}"}
# teacher-student agreement (%) and KL(teacher || student) at T = 1 on val: n/a without a teacher or a val bank
FIDELITY = ("agree", "kl")
log = logging.getLogger(__name__)


def expand(paths: Sequence[str]) -> list[str]:
    """Each path, or, for a folder that is not a run (no ``final.json``) but holds runs one level down, those runs
    (sorted)."""
    out: list[str] = []
    for p in paths:
        inner = sorted(str(d) for d in Path(p).glob("*/final.json")) if not (Path(p) / "final.json").exists() else []
        out += [str(Path(f).parent) for f in inner] or [p]
    return out


def collect(paths: Sequence[str], left_out: list[str] | None = None) -> list[dict]:
    """One row per run directory with a readable ``final.json``. The others (unfinished runs, other folders,
    unreadable files) are appended to ``left_out`` as ``"PATH (why)"``, or, without that list, named in a
    warning."""
    rows, quiet = [], left_out is not None
    left_out = [] if left_out is None else left_out
    for p in paths:
        f = Path(p) / "final.json"
        try:
            d = json.loads(f.read_text())
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            left_out.append(f"{p} (no final.json: unfinished or not a run)")
            continue
        except (OSError, ValueError) as e:
            left_out.append(f"{p} (unreadable final.json: {' '.join(str(e).split())[:80]})")
            continue
        bank = d.get("bank") or "-"
        banks = "+".join(Path(b).name for b in bank.split(",")) if bank not in ("-", "live") else bank
        rows.append({
            "run": Path(p).name, "method": d.get("method"), "student": d.get("student"),
            "teacher": d.get("teacher") or "-", "bank": banks, "preset": d.get("preset", "-"),
            "amp": d.get("amp", "-"), "epochs": d.get("epochs"), "top1": d.get("top1"), "top5": d.get("top5"),
            "ece": d.get("ece"), "nll": d.get("nll"), "agree": d.get("teacher_agreement"),
            "kl": d.get("teacher_kl"), "time_s": d.get("train_time_s"),
        })
    rows.sort(key=lambda r: (str(r["bank"]), str(r["method"]), str(r["run"])))
    if left_out and not quiet:
        log.warning("%d path(s) left out of the table: %s", len(left_out), "; ".join(left_out))
    return rows


def _fmt(column: str, v) -> str:
    if v is None:
        return "n/a" if column in FIDELITY else "-"
    if column in FORMATS and isinstance(v, (int, float)):
        return FORMATS[column].format(v)
    return str(v)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    cells = [[_fmt(c, r[c]) for c in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = CliParser(prog="python -m pipeline.report", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories, or folders of runs (searched one level down)")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    left_out: list[str] = []
    rows = collect(expand(args.runs), left_out)
    if not rows:
        raise UsageError(f"no finished runs (final.json) among {len(args.runs)} path(s): {'; '.join(left_out)[:400]}")
    if left_out:
        log.warning("%d path(s) left out of the table: %s", len(left_out), "; ".join(left_out))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
