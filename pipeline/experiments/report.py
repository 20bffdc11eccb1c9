"""RESULTS.md from the suites' summaries: the claims table at the top, then one section per suite (grid and choice,
table over seeds, convergence evidence, plot, automatic reading). Nothing in it is edited by hand.

Each suite's summary is kept in ``results/<suite>.json`` next to its plot, so RESULTS.md (and its claims table)
is rebuilt from every suite run so far whenever one suite runs again.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError
from pipeline.experiments.plan import Claim, Comparison, Scale, claims

NOISE_Z = 2.0  # a difference counts beyond seed noise when it exceeds 2 standard errors of the difference


def mean_std(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def compare(a: list[float], b: list[float], expect: str) -> tuple[float, float, str]:
    """(difference of means a − b, its noise threshold, verdict) for the expectation ``expect`` on the values:
    ``>`` (a higher), ``<`` (a lower; e.g. a lower ECE) or ``~`` (equal). The threshold is 2 standard errors of
    the difference (per-arm seed variance; a single seed per arm gives no noise estimate: threshold 0).
    Verdicts: ``held`` (beyond noise in the expected direction, or within noise when equality is expected),
    ``within noise``, ``reversed``, ``not held`` (equality expected, difference beyond noise); ``one seed`` when
    either side has a single value (no noise estimate: no verdict)."""
    d = statistics.mean(a) - statistics.mean(b)
    if min(len(a), len(b)) < 2:
        return d, math.nan, "one seed"
    var = sum(statistics.variance(x) / len(x) for x in (a, b) if len(x) > 1)
    noise = NOISE_Z * math.sqrt(var)
    if expect == "~":
        return d, noise, "held" if abs(d) <= noise else "not held"
    want = d if expect == ">" else -d
    if want > noise:
        return d, noise, "held"
    return d, noise, "reversed" if want < -noise else "within noise"


def claims_table(scale: Scale, summaries: dict[str, dict[str, Any]]) -> str:
    lines = ["| claim | source | published effect | here (mean ± std over seeds; difference, noise) | held? |",
             "|---|---|---|---|---|"]
    for c in claims(scale):
        cells, verdicts = [], []
        for cmp in c.comparisons:
            s = summaries.get(cmp.suite)
            arms = (s or {}).get("arms", {})
            if cmp.a not in arms or cmp.b not in arms:
                cells.append(f"{cmp.a} vs {cmp.b}: not run")
                verdicts.append("not run")
                continue
            a, b = arms[cmp.a][cmp.metric], arms[cmp.b][cmp.metric]
            d, noise, v = compare(a, b, cmp.expect)
            unit = {"ece": "", "time_s": " s"}.get(cmp.metric, " pt")
            digits = {"ece": 4, "time_s": 0}.get(cmp.metric, 2)
            where = "100 classes: " if (s or {}).get("task") == "pairs100" else ""
            cells.append(f"{where}{cmp.a} {mean_std(a, digits)} vs {cmp.b} {mean_std(b, digits)} ({cmp.metric}: "
                         f"{d:+.{digits}f}{unit}, " + (f"noise {noise:.{digits}f})" if v != "one seed" else
                                                       "one seed: no noise estimate)"))
            verdicts.append(f"{v}" + (" (≈ expected)" if cmp.expect == "~" and v != "one seed" else ""))
        lines.append(f"| {c.claim} | {c.source} | {c.published} | {'<br>'.join(cells)} | {'<br>'.join(verdicts)} |")
    return "\n".join(lines)


def section(name: str, s: dict[str, Any], plot: str | None) -> str:
    """One suite's section (between ``<!-- suite:NAME -->`` markers)."""
    out = [f"## {s['title']}", "", f"Command: `python -m pipeline.experiments {name}`. {s['recipe']}", ""]
    if s.get("note"):
        out += [s["note"], ""]
    out += _convergence(s) + [""]
    grids = {lab: a for lab, a in s["arms"].items() if a.get("grid")}
    if grids:
        out += ["Hyperparameters chosen on the held-out training images (seed 0, the same recipe); the first setting "
                "is the published default:", "", "| method | grid (held-out top-1) | chosen |", "|---|---|---|"]
        seen = set()
        for a in grids.values():
            if a["method"] in seen:
                continue
            seen.add(a["method"])
            cells = ", ".join(f"{_fmt_loss(g)}: {t:.2f}" for g, t in a["grid"])
            out.append(f"| {a['method']} | {cells} | {_fmt_loss(a['chosen'])} |")
        out.append("")
    out += ["| arm | method | student | loss | top-1 (%) | ECE | NLL | agree (%) | KL | train s | bank B/sample |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lab, a in s["arms"].items():
        bb = "-" if a.get("bank_bytes") is None else f"{a['bank_bytes']:.1f}"
        out.append(f"| {lab} | {a['method']} | {a['student']} | {_fmt_loss(a['loss'])} | {mean_std(a['top1'])} | "
                   f"{mean_std(a['ece'], 4)} | {mean_std(a['nll'], 4)} | {mean_std(a.get('teacher_agreement', []))} | "
                   f"{mean_std(a.get('teacher_kl', []), 4)} | {mean_std(a.get('time_s', []), 0)} | {bb} |")
    out += ["", "Agree / KL: the student's top-1 agreement with its teacher and KL(teacher ‖ student) at T = 1 on the "
            "val images (their val bank, or the live teacher); train s: training time of the run (one thread)."]
    for k, v in (s.get("measurements") or {}).items():
        out += ["", f"{k}: {v}"]
    if plot:
        out += ["", f"![{name}]({plot})"]
    t = s.get("timing")
    if t:
        out += ["", f"Time: this suite ran in `python -m pipeline.experiments {' '.join(t['suites'])}` "
                f"({_at_a_time(t['jobs'])}); its phases took (wall minutes, runs already finished by an earlier "
                f"invocation cost nothing): " + ", ".join(f"{k} {v:.1f}" for k, v in t["minutes"].items()) + "."]
        if t.get("invocations", 1) > 1:
            total = t["plan_minutes"]
            out[-1] += (f" Over all {t['invocations']} invocations on its run folder (resumes and other suites "
                        f"included): " + ", ".join(f"{k} {v:.1f}" for k, v in total.items())
                        + f"; {sum(total.values()) / 60:.2f} h in all.")
    out += ["", "Reading: " + reading(s), ""]
    return "\n".join(out)


def _fmt_loss(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()) or "defaults"


CONVERGED_PT = 0.3  # converged: val top-1 of the last 3 epochs within this many points


def converged(last_top1: list[list[float]]) -> str:
    """The verdict on runs' last 3 epochs' val top-1 (one list per run): converged when each moved less than
    :data:`CONVERGED_PT` points; runs of fewer than 3 epochs cannot tell."""
    if any(len(x) < 3 for x in last_top1):
        return "fewer than 3 epochs: convergence not measurable"
    ok = all(max(x) - min(x) < CONVERGED_PT for x in last_top1)
    return f"< {CONVERGED_PT} pt: converged" if ok else f"not below {CONVERGED_PT} pt: not converged"


def _convergence(s: dict[str, Any]) -> list[str]:
    lines = ["Convergence (val top-1 of the last 3 epochs within 0.3 pt):"]
    for name, t in s.get("teachers", {}).items():
        lines.append(f"- teacher `{name}` ({t['arch']}, {t['epochs']} epochs, {t['train_images']} images): val top-1 "
                     f"of the last epochs {', '.join(f'{x:.2f}' for x in t['last_top1'])} "
                     f"({converged([t['last_top1']])}); final train loss {t['train_loss']:.4f}")
    ce = s.get("baseline")
    if ce:
        moves = [round(max(x) - min(x), 2) for x in ce["last_top1"]]
        lines.append(f"- student baseline `{ce['label']}`: val top-1 over its last 3 epochs moved {moves} pt per seed "
                     f"({converged(ce['last_top1'])}); final train loss {mean_std(ce['train_loss'], 4)}")
    return lines


def reading(s: dict[str, Any]) -> str:
    """Each arm against the suite's first arm with the same student: difference, noise and verdict."""
    items = list(s["arms"].items())
    out = []
    for base_label, base in items[:1]:
        for label, a in items[1:]:
            if a["student"] != base["student"]:
                continue
            d, noise, v = compare(a["top1"], base["top1"], ">")
            de = statistics.mean(a["ece"]) - statistics.mean(base["ece"])
            word = {"held": "better", "reversed": "worse"}.get(v, "within seed noise")
            why = "one seed, no noise estimate" if v == "one seed" else f"{word}, noise {noise:.2f}"
            out.append(f"{label}: {d:+.2f} pt top-1 vs {base_label} ({why}), ECE {de:+.4f}")
    return "; ".join(out) + "." if out else "a single arm."


def _at_a_time(jobs: int) -> str:
    return f"{jobs} runs at a time" if jobs else "one run after another in one process"


HEADER = """# Results

Generated by {command}; no number here is edited by hand. Every
run is on CPU on the embedded Fashion-MNIST (28 px images resized to 32; 10 classes) or on the 100-class task built
from it (`pairs100`: two items stacked, class = the pair; suites marked "100 classes"), far from the papers'
ImageNet and CIFAR settings, so what can be checked is the direction of each published effect, not its size.

How the runs are set up: {setup}

Verdicts: a difference counts when it exceeds {z:g} standard errors of the difference of the means over seeds
("held" in the expected direction, "reversed" against it, "within noise" otherwise; for claims of equality,
"held" when the difference is within that noise).
"""


def write_results(md: Path, scale: Scale, summaries: dict[str, dict[str, Any]], plots: dict[str, str],
                  order: list[str]) -> None:
    """Rewrite ``md`` whole: header, the suites of ``order`` with no summary yet, claims table, every summarised
    suite in ``order``."""
    setup = summaries[next(iter(summaries))]["setup"] if summaries else ""
    command = ("`python -m pipeline.experiments --quick` (the tiny plan: a few steps per run on a few images; its "
               "numbers test the plan's code, not the methods)" if scale.max_steps
               else "`python -m pipeline.experiments all` (`make results`)")
    parts = [HEADER.format(command=command, setup=setup, z=NOISE_Z)]
    missing = [name for name in order if name not in summaries]
    if missing:
        quick = " --quick" if scale.max_steps else ""
        parts += [f"Not run yet at this scale: {', '.join(missing)} (their claims say \"not run\"; `python -m "
                  f"pipeline.experiments{quick} {' '.join(missing)}` runs them, reusing every finished run).", ""]
    timed = [x["timing"] for x in summaries.values() if x.get("timing", {}).get("plan_minutes")]
    if timed:
        t = max(timed, key=lambda x: (x["invocations"], sum(x["plan_minutes"].values())))
        total = t["plan_minutes"]
        parts += [f"Measured time of the plan ({t['invocations']} invocation(s) on one run folder, "
                  f"{_at_a_time(t['jobs'])}; wall minutes per phase): " + ", ".join(f"{k} {v:.1f}" for k, v in total.items())
                  + f"; {sum(total.values()) / 60:.2f} h in all.", ""]
    parts += ["## Claims", "", claims_table(scale, summaries), ""]
    for name in order:
        if name in summaries:
            parts += [f"<!-- suite:{name} -->", section(name, summaries[name], plots.get(name)),
                      f"<!-- /suite:{name} -->", ""]
    md.write_text("\n".join(parts).rstrip() + "\n")


def plot(name: str, s: dict[str, Any], out: Path) -> str:
    """Top-1 (mean ± std) and ECE per arm -> ``out/<name>.png`` (suites of kind ``time``: top-1 against training
    time); returns the file name."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if s.get("kind") == "time":
        return _plot_time(name, s, out, plt)
    labels = list(s["arms"])
    means = [statistics.mean(s["arms"][x]["top1"]) for x in labels]
    errs = [statistics.stdev(s["arms"][x]["top1"]) if len(s["arms"][x]["top1"]) > 1 else 0 for x in labels]
    eces = [statistics.mean(s["arms"][x]["ece"]) for x in labels]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.5))
    axes[0].barh(labels, means, xerr=errs, color="tab:blue")
    pad = 3 * max(errs + [0.5]) + 1
    axes[0].set_xlim(min(means) - pad, max(means) + pad)
    axes[0].set_xlabel("val top-1 (%)")
    axes[0].invert_yaxis()
    axes[1].barh(labels, eces, color="tab:orange")
    axes[1].set_xlabel("val ECE")
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(s["title"])
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=90)
    plt.close(fig)
    return f"{name}.png"


def _plot_time(name: str, s: dict[str, Any], out: Path, plt: Any) -> str:
    """Val top-1 against cumulative training seconds, one line per seed; an arm with a bank is drawn again,
    dashed, shifted by its dump time."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, a) in enumerate(s["arms"].items()):
        color = f"C{i}"
        for k, curve in enumerate(a.get("curves", [])):
            t, top1 = zip(*curve) if curve else ((), ())
            ax.plot(t, top1, color=color, marker="o", ms=3, label=label if k == 0 else None)
            if a.get("dump_s"):
                ax.plot([x + a["dump_s"] for x in t], top1, color=color, ls="--", alpha=0.6,
                        label=f"{label} + dump ({a['dump_s']:.0f} s)" if k == 0 else None)
    ax.set_xlabel("training time (s, one thread)")
    ax.set_ylabel("val top-1 (%)")
    ax.legend(fontsize=8)
    ax.set_title(s["title"])
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=90)
    plt.close(fig)
    return f"{name}.png"


def load_summaries(folder: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{suite: summary} of the ``results/<suite>.json`` files in ``folder`` (with ``names``: only those suites;
    other json files are left alone). UsageError naming the file when one is not a suite summary."""
    out = {}
    for p in sorted(folder.glob("*.json")):
        if names is not None and p.stem not in names:
            continue
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{p} is not a suite summary ({type(e).__name__}: {' '.join(str(e).split())}); "
                             "rerun that suite, or remove the file") from None
        if not isinstance(s, dict) or not isinstance(s.get("arms"), dict):
            raise UsageError(f"{p} is not a suite summary (no 'arms'); rerun that suite, or remove the file")
        out[p.stem] = s
    return out


__all__ = ["Claim", "Comparison", "claims_table", "compare", "load_summaries", "plot", "section", "write_results"]
