"""Every results suite runs end to end in its tiny configuration (keeps the experiment code alive): teachers,
banks (dense, views, compact-on-write, embeddings), every arm, the measurements, the summaries, the claims table
and the plots; a second run reuses every finished run."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.experiments import SCALES, main, suites
from pipeline.experiments.plan import claims
from pipeline.experiments.report import compare


@pytest.mark.slow
def test_all_suites_tiny(tmp_path, demo_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    md = tmp_path / "RESULTS.md"
    common = ["--scale", "tiny", "--root", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data"),
              "--results", str(md)]
    assert main(["all", *common]) == 0
    text = md.read_text()
    assert text.index("## Claims") < text.index("<!-- suite:methods -->")
    for c in claims(SCALES["tiny"]):
        assert f"| {c.claim} |" in text
    for name in suites(SCALES["tiny"]):
        assert f"<!-- suite:{name} -->" in text and f"<!-- /suite:{name} -->" in text
        assert (tmp_path / "results" / f"{name}.png").is_file()
        summary = json.loads((tmp_path / "results" / f"{name}.json").read_text())
        assert all(len(a["top1"]) == 1 for a in summary["arms"].values())
    assert "Step time (one interleaved measurement" in text and "Exactness" in text
    assert "Not run yet" not in text  # every suite ran
    jobs = sorted(p for p in (tmp_path / "runs" / "tiny" / "jobs").iterdir() if p.is_dir())  # not .log/.yaml
    mtimes = {p: (p / "final.json").stat().st_mtime_ns for p in jobs}
    # Re-running one suite reuses every finished run and rewrites RESULTS.md whole (no duplicated section)
    assert main(["methods", *common]) == 0
    assert md.read_text().count("<!-- suite:methods -->") == 1 and "<!-- suite:embedding -->" in md.read_text()
    assert {p: (p / "final.json").stat().st_mtime_ns for p in jobs} == mtimes
    # --report-only rewrites RESULTS.md from the summaries alone (a plan run in parts): the same text
    before = md.read_text()
    md.unlink()
    assert main(["--report-only", "--scale", "tiny", "--results", str(md)]) == 0
    assert md.read_text() == before
    # summaries of the tiny scale are not rewritten into a full-scale report
    assert main(["--report-only", "--results", str(md)]) == 2 and md.read_text() == before


def test_verdicts():
    assert compare([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], ">")[2] == "held"
    assert compare([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], ">")[2] == "reversed"
    assert compare([1.0, 3.0, 2.0], [1.5, 2.5, 2.0], ">")[2] == "within noise"
    assert compare([0.02, 0.021], [0.03, 0.031], "<")[2] == "held"  # a lower ECE, as expected
    assert compare([1.0, 1.1], [1.05, 1.0], "~")[2] == "held" and compare([3.0, 3.1], [1.0, 1.1], "~")[2] == "not held"
    assert compare([2.0], [1.0], ">")[2] == "one seed" == compare([1.0, 1.2], [3.0], "~")[2]  # no noise estimate


def test_suites_cut_to_fewer_seeds_say_so():
    """A suite cut to one seed runs the scale's first seed only, and its recipe line says it was cut; the claims
    table gives no verdict on a single run per arm."""
    from pipeline.experiments import _recipe
    from pipeline.experiments.report import claims_table

    scale = SCALES["full"]
    plan = suites(scale)
    assert plan["tfkd"].seeds_of(scale) == (0,) and plan["methods"].seeds_of(scale) == scale.seeds
    assert "cut from 3" in _recipe(scale, "fmnist10", (0,)) and "cut" not in _recipe(scale, "fmnist10", scale.seeds)
    assert "no noise estimate" in _recipe(scale, "fmnist10", (0,))  # one seed: the claims say "one seed"
    assert "no noise estimate" not in _recipe(scale, "fmnist10", (0, 1))  # two seeds: a (weak) noise estimate
    arms = {"teacher labels only (kd, alpha 1), every image": {"top1": [80.0]},
            f"ce, {scale.labeled} labels per class (as many steps)": {"top1": [70.0]}}
    row = next(x for x in claims_table(scale, {"label-efficiency": {"arms": arms}}).splitlines()
               if x.startswith("| Teacher labels on unlabelled images"))
    assert "one seed: no noise estimate" in row and row.endswith("| one seed |")


def test_report_only_and_no_suite_are_checked(capsys, tmp_path):
    """Bad requests of the plan CLI exit 2 in one line and never overwrite a RESULTS.md with less than it holds
    (found by a new user's trial: --report-only in a fresh clone emptied RESULTS.md; damaged summaries,
    a folder as --results, 'all' with names and --jobs -1 gave tracebacks or were ignored)."""
    def err(argv):
        assert main(argv) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1
        return lines[0]

    assert "name the suite(s)" in err([])
    assert "give no suite" in err(["--report-only", "methods"])
    md = tmp_path / "RESULTS.md"
    md.write_text("real results\n")
    assert "no suite summaries" in err(["--report-only", "--results", str(md)])
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.json").write_text("{}")  # not a suite's name: left alone
    assert "no suite summaries" in err(["--report-only", "--results", str(md)])
    for bad in ("", '{"title": "x"', "[1, 2]", '{"title": "x"}'):
        (folder / "formats.json").write_text(bad)
        assert "formats.json is not a suite summary" in err(["--report-only", "--results", str(md)])
    assert md.read_text() == "real results\n"
    assert "drop --jobs" in err(["--report-only", "--jobs", "2", "--results", str(md)])
    assert "it is a folder" in err(["--report-only", "--results", str(tmp_path)])
    assert "cannot write" in err(["formats", "--quick", "--results", str(tmp_path / "no" / "R.md")])
    assert "'all' stands alone" in err(["all", "formats"])
    assert "--jobs -1" in err(["formats", "--quick", "--jobs", "-1"])


def test_unknown_suite_is_a_usage_error(capsys):
    assert main(["nope", "--scale", "tiny"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_claim_names_arms_that_exist(scale):
    """A claim whose suite or arm label is misspelt would print 'not run' forever; every one must resolve."""
    plan = suites(SCALES[scale])
    for c in claims(SCALES[scale]):
        for cmp in c.comparisons:
            labels = [a.label for a in plan[cmp.suite].arms]
            assert cmp.a in labels and cmp.b in labels, (c.claim, cmp)


def test_hundred_class_suites_use_the_hundred_class_teacher():
    from pipeline.experiments.plan import TASKS, TEACHERS

    for s in suites(SCALES["full"]).values():
        for a in s.arms:
            for t in (*a.teachers, *([a.live] if a.live else [])):
                assert (TEACHERS[t].data == "pairs") == (s.task == "pairs100"), (s.name, a.label, t)
    assert TASKS["pairs100"].teacher("big") == "big100" and TASKS["fmnist10"].teacher("big") == "big"


def test_convergence_verdict():
    from pipeline.experiments.report import converged

    assert converged([[80.0, 80.1, 80.2], [70.0, 70.2, 70.1]]).endswith("converged")
    assert "not converged" in converged([[80.0, 80.1, 80.4]])
    assert "not measurable" in converged([[80.0, 80.1]])


def test_quick_plan_runs_the_new_suites(tmp_path, demo_root, monkeypatch):
    """--quick: the 100-class, 2-rank and time suites end to end in seconds, with their table columns and plot."""
    monkeypatch.chdir(tmp_path)
    md = tmp_path / "RESULTS.md"
    assert main(["ranks", "time-to-accuracy", "--quick", "--root", str(tmp_path / "runs"), "--data-root",
                 str(tmp_path / "data"), "--results", str(md)]) == 0
    summary = json.loads((tmp_path / "results" / "time-to-accuracy.json").read_text())
    curve = summary["arms"]["kd, bank"]["curves"][0]
    assert len(curve) == 1 and curve[0][0] > 0  # (training seconds, top-1) after the one epoch
    assert summary["arms"]["kd, bank"]["dump_s"] > 0 and summary["arms"]["kd, live"]["dump_s"] is None
    ranks = json.loads((tmp_path / "results" / "ranks.json").read_text())["arms"]
    assert ranks["kd, 2 ranks, --sync-bn"]["ranks"] == ranks["kd, 2 ranks, per-rank BN"]["ranks"] == 2
    jobs = tmp_path / "runs" / "tiny" / "jobs"
    configs = [yaml.safe_load(p.read_text()) for p in jobs.glob("*.yaml")]
    assert sum(bool(c.get("sync_bn")) for c in configs) == 2  # the two --sync-bn arms, one seed each
    finals = [json.loads(p.read_text()) for p in jobs.glob("*/final.json")]
    assert sorted({f["world_size"] for f in finals}) == [1, 2]
    assert {f["global_batch_size"] for f in finals} == {32}
    text = md.read_text()
    assert "| agree (%) | KL |" in text and "A run on 2 ranks with --sync-bn equals a run on 1 rank" in text
    assert "Without --sync-bn, 2 ranks still equal 1 rank" in text
    assert "`python -m pipeline.experiments --quick` (the tiny plan" in text  # never mistaken for real results
    # a second invocation (a resumed plan) adds its phases to the plan's time, which RESULTS.md reports whole;
    # without --results a quick plan writes under results/runs/tiny, never over the real RESULTS.md and summaries
    assert main(["ranks", "--quick", "--root", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data")]) == 0
    assert md.read_text() == text and json.loads((tmp_path / "results" / "ranks.json").read_text())["arms"] == ranks
    md, folder = tmp_path / "results" / "runs" / "tiny" / "RESULTS.md", tmp_path / "results" / "runs" / "tiny" / "results"
    records = [json.loads(l) for l in (tmp_path / "runs" / "tiny" / "timing.jsonl").read_text().splitlines()]
    assert [r["suites"] for r in records] == [["ranks", "time-to-accuracy"], ["ranks"]]
    timing = json.loads((folder / "ranks.json").read_text())["timing"]
    assert timing["invocations"] == 2 and timing["plan_minutes"]["teachers"] == pytest.approx(
        sum(r["minutes"]["teachers"] for r in records), abs=0.02)
    assert "Measured time of the plan (2 invocation(s) on one run folder" in md.read_text()
    assert "Over all 2 invocations on its run folder" in md.read_text()


def test_grid_runs_train_a_shorter_schedule_scored_once(tmp_path):
    """Full scale: a grid run trains half the arms' epochs on the held-out split and evaluates only at its end;
    DKD's KD-weight warm-up follows the run's own epochs (a quarter), on either task."""
    from pipeline.experiments.runner import Runner

    scale = SCALES["full"]
    runner = Runner(tmp_path / "runs", scale)
    runner.trees = {k: tmp_path / k for k in ("student", "grid", "pairs")}
    for task in ("fmnist10", "pairs100"):
        (setting, job), *_ = runner.grid_jobs("ls", task)
        assert job.config["epochs"] == job.config["eval_every"] == scale.grid_epochs(task) < scale.epochs(task)
        assert job.config["eval_last"] == 1 and job.config["precise_bn"] == scale.precise_bn > 0
        assert job.config["val_split"] == {"fmnist10": "val", "pairs100": "heldout"}[task]
        assert job.config["loss"]["eps"] == setting["eps"]
    from pipeline.experiments.plan import Arm

    arm = runner.arm_overrides(Arm("dkd", "dkd"), {}, "pairs100")
    assert arm["epochs"] == scale.pairs_student_epochs and "eval_every" not in arm
    assert arm["loss"]["warmup_epochs"] == scale.pairs_student_epochs // 4


@pytest.mark.parametrize("scale_name", ["tiny", "full"])
def test_two_invocations_never_train_one_job_at_once(tmp_path, monkeypatch, scale_name):
    """Two plan invocations at once share jobs (the same config hashes to the same run directory): a job one of
    them is training is waited for and then found done, never trained again in the same directory."""
    import threading
    import time

    from pipeline.experiments.runner import Job, Runner

    runner = Runner(tmp_path / "runs", SCALES[scale_name])
    job = Job({"method": "ce", "seed": 0}, runner.root)
    calls: list[float] = []
    inside = threading.Event()

    def train(j: Job) -> bool:  # stands in for the training process: writes final.json at its end
        calls.append(time.time())
        inside.set()
        time.sleep(0.5)
        j.dir.mkdir(parents=True, exist_ok=True)
        (j.dir / "final.json").write_text("{}")
        return True

    monkeypatch.setattr(runner, "_run_here", train)
    monkeypatch.setattr(runner, "_run_one", train)
    first = threading.Thread(target=runner.run_jobs, args=([job], "first"))
    first.start()
    assert inside.wait(10)
    runner.run_jobs([Job({"method": "ce", "seed": 0}, runner.root)], "second")  # the same job, not yet done
    first.join()
    assert len(calls) == 1 and job.done


def test_results_name_the_suites_not_run_yet(tmp_path):
    """A plan run in parts (some suites later) says in RESULTS.md which suites have no summary yet, and their
    claims read "not run"."""
    from pipeline.experiments.report import write_results

    md = tmp_path / "RESULTS.md"
    write_results(md, SCALES["tiny"], {}, {}, ["methods", "tfkd"])
    text = md.read_text()
    assert "Not run yet at this scale: methods, tfkd" in text
    assert "python -m pipeline.experiments --quick methods tfkd" in text  # the tiny scale's own command
    assert "| not run" in text or "not run |" in text
