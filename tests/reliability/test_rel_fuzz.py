"""Fault 8: CLI and config fuzzing (hypothesis), and properties of the manifest fingerprint and the cache key.

Random option values, ``key=value`` overrides and YAML files given to ``pipeline.dump_logits``,
``pipeline.train_student`` and ``pipeline.labels``: the exit code is 2 (argparse or UsageError) — 1 for
``labels verify`` of a broken bank, 0 for an accidentally valid read-only ``labels info/verify`` — with one
``error:`` line and never a traceback. No real job can start: ``--data`` always names a missing folder (it
is checked before anything is built or written) and the bank tools get missing or non-bank inputs."""

from __future__ import annotations

import contextlib
import io
import os
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.bank.identity import bank_key
from pipeline.data import build_manifest, fingerprint

# REL_FUZZ_EXAMPLES=2000 runs a longer, randomized search (the default is small, fixed and fast)
_N = int(os.environ.get("REL_FUZZ_EXAMPLES", "40"))
SETTINGS = settings(max_examples=_N, deadline=None, derandomize="REL_FUZZ_EXAMPLES" not in os.environ, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MISSING = "/nonexistent/rel-fuzz-data"

DUMP_KEYS = ["teacher", "weights", "data", "split", "preset", "device", "batch_size", "workers", "out", "overwrite",
             "dtype", "rows_per_chunk", "skip_corrupt", "views", "view_policy", "view_seed", "seed", "amp"]
TRAIN_KEYS = ["method", "loss", "student", "student_weights", "banks", "teacher", "teacher_weights", "live_teacher",
              "live_teacher_weights", "preset", "train_split", "val_split", "augment", "replay_views",
              "train_subset", "epochs", "batch_size", "workers", "device", "seed", "amp", "channels_last",
              "max_steps_per_epoch", "log_every", "output_dir", "resume", "overwrite", "optim", "sched",
              "optim.lr", "optim.name", "optim.momentum", "optim.betas", "sched.name", "sched.milestones",
              "sched.warmup_epochs", "loss.T", "loss.alpha"]

# option values: plausible, boundary and garbage (never starting with "-" unless a number: argparse would read
# "-h" as --help)
_WORDS = ["", "0", "1", "-1", "-0.5", "1e400", "nan", "inf", ".nan", "none", "null", "true", "DEFAULT", "resnet18",
          "democnn_s", "cuda", "cpu", "train", "val", "float16", "int8", "kd", "ce", "imagenet", "demo", "[1, 2]",
          "{a: 1}", "a,b", "~", "é", "x" * 300, "1_000", "0x10", "3.5", "[", "{", "'", "\"", ": :", "rrc+flip"]
VALUE = st.one_of(
    st.sampled_from(_WORDS),
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=string.ascii_letters + string.digits + " ._/:=,[]{}'\"#!&*", max_size=20)
    .filter(lambda s: not s.startswith("-")),
)
YAML_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=10), st.sampled_from(_WORDS))


def _yaml_doc(keys: list[str]):
    leaf_keys = st.one_of(st.sampled_from([k.split(".")[0] for k in keys]), st.text(max_size=8))
    value = st.recursive(YAML_SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(leaf_keys, c, max_size=3),
                         max_leaves=8)
    structured = st.dictionaries(leaf_keys, value, max_size=5).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    raw = st.one_of(st.text(max_size=60), st.sampled_from(["[1, 2", "a: [", "- 1\n- 2", "42", "''", "a: b: c",
                                                           "\t-", "!!python/object:os.system x", "epochs: .nan"]))
    return st.one_of(structured, raw, st.binary(max_size=40), st.just(None))  # bytes: maybe not UTF-8


def _options(flags: dict[str, bool]):
    """A list of [flag, value?] pieces: ``flags`` maps option -> takes a value."""
    one = st.sampled_from(sorted(flags)).flatmap(
        lambda f: st.tuples(st.just(f), VALUE).map(list) if flags[f] else st.just([f]))
    return st.lists(one, max_size=6).map(lambda xs: [a for x in xs for a in x])


def _overrides(keys: list[str]):
    key = st.one_of(st.sampled_from([k for k in keys if k != "data"]), st.text(alphabet=string.ascii_lowercase + "._",
                                                                               max_size=10))
    item = st.one_of(st.tuples(key, VALUE).map(lambda kv: f"{kv[0]}={kv[1]}"),
                     st.sampled_from(["novalue", "=3", "a.b.c=1", "epochs=", "optim=3", "loss=[1]"]))
    return st.lists(item, max_size=4)


def _call(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def _check(rc: int, err: str, allowed: tuple[int, ...] = (2,)) -> None:
    assert "Traceback" not in err, err
    assert rc in allowed, (rc, err)
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error:" in ln]
        assert len(errors) == 1, err
        if not lines[-1].startswith("usage:") and not any(ln.startswith("usage:") for ln in lines):
            assert lines == errors, err  # not argparse: the message is the only line


def _config_file(doc: str | bytes | None, where: Path) -> list[str]:
    if doc is None:
        return []
    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="rel_fuzz_", dir=where)
    with os.fdopen(fd, "wb") as f:
        f.write(doc if isinstance(doc, bytes) else doc.encode())
    return ["--config", path]


DUMP_FLAGS = {"--teacher": True, "--weights": True, "--split": True, "--preset": True, "--device": True,
              "--batch-size": True, "--workers": True, "--out": True, "--overwrite": False, "--dtype": True,
              "--rows-per-chunk": True, "--skip-corrupt": False, "--views": True, "--view-policy": True,
              "--view-seed": True, "--seed": True, "--amp": False, "--bogus-flag": True}
TRAIN_FLAGS = {"--method": True, "--student": True, "--student-weights": True, "--teacher": True,
               "--teacher-weights": True, "--labels": True, "--live-teacher": True, "--preset": True,
               "--epochs": True, "--batch-size": True, "--lr": True, "--workers": True, "--resume": False,
               "--overwrite": False, "--seed": True, "--device": True, "--amp": True, "--channels-last": False,
               "--replay-views": False, "--no-augment": False, "--unknown": False}


@SETTINGS
@given(opts=_options(DUMP_FLAGS), overrides=_overrides(DUMP_KEYS), doc=_yaml_doc(DUMP_KEYS))
def test_fuzz_dump_logits_cli(opts, overrides, doc, tmp_path):
    from pipeline.dump_logits import main

    rc, out, err = _call(main, ["--data", MISSING, *opts, *_config_file(doc, tmp_path), *overrides])
    _check(rc, err)
    assert out == ""


@SETTINGS
@given(opts=_options(TRAIN_FLAGS), overrides=_overrides(TRAIN_KEYS), doc=_yaml_doc(TRAIN_KEYS))
def test_fuzz_train_student_cli(opts, overrides, doc, tmp_path, tmp_path_factory):
    from pipeline.train_student import main

    out_dir = str(tmp_path_factory.getbasetemp() / "rel_fuzz_never_created")
    rc, out, err = _call(main, ["--data", MISSING, "--output-dir", out_dir, *opts, *_config_file(doc, tmp_path),
                                *overrides])
    _check(rc, err)
    assert out == "" and not Path(out_dir).exists()


@SETTINGS
@given(data=st.data())
def test_fuzz_labels_cli(data, demo_bank, tmp_path_factory):
    from pipeline.labels import main

    base = tmp_path_factory.getbasetemp()
    not_a_bank = base / "rel_fuzz_not_a_bank"
    not_a_bank.mkdir(exist_ok=True)
    bank_in = st.sampled_from([MISSING + ".zarr", str(not_a_bank), "file:///nonexistent/x.zarr", "", "memory://x"])
    cmd = data.draw(st.sampled_from(["info", "verify", "ensemble", "compact", "stats", "nope", None]))
    out = str(base / "rel_fuzz_out" / data.draw(st.sampled_from(["o.zarr", "p", "q.zarr"])))
    if cmd in ("info", "verify"):
        args = [cmd, data.draw(st.one_of(bank_in, st.just(str(demo_bank))))]
        args += data.draw(st.sampled_from([[], ["--json"], ["--bogus"]]))
        allowed = (0, 1, 2) if cmd == "verify" else (0, 2)
    elif cmd == "ensemble":
        args = [cmd, *data.draw(st.lists(bank_in, min_size=0, max_size=3)), "-o", out]
        args += data.draw(_options({"--mode": True, "--dtype": True, "--rows-per-chunk": True, "--overwrite": False,
                                    "--scheduler": True, "--no-progress": False}))
        allowed = (2,)
    elif cmd == "compact":
        args = [cmd, data.draw(bank_in)] + data.draw(st.sampled_from([["-o", out], []]))
        args += data.draw(_options({"--format": True, "--topk": True, "--rows-per-chunk": True,
                                    "--overwrite": False, "--scheduler": True}))
        allowed = (2,)
    elif cmd == "stats":
        args = [cmd, data.draw(bank_in)] + data.draw(st.sampled_from([["--plots", out], []]))
        args += data.draw(_options({"--view": True, "--overwrite": False, "--scheduler": True}))
        allowed = (2,)
    else:
        args = [] if cmd is None else [cmd, data.draw(VALUE)]
        allowed = (2,)
    rc, stdout, err = _call(main, args)
    if rc == 1:  # verify: one FAIL line per problem, then the one line of the fix
        lines = err.strip().splitlines()
        assert len(lines) >= 2 and all(ln.startswith("FAIL ") for ln in lines[:-1]), err
        assert lines[-1].startswith("fix: "), err
    _check(rc, err, allowed)
    assert not (base / "rel_fuzz_out").exists()


def test_argparse_errors_exit_2(capsys):
    from pipeline.dump_logits import main as dump
    from pipeline.labels import main as labels
    from pipeline.train_student import main as train

    for main, argv in [(dump, ["--batch-size", "x"]), (dump, ["--split", "nope"]), (train, ["--epochs", "1.5"]),
                       (train, ["--device", "tpu"]), (labels, []), (labels, ["verify"]), (labels, ["frobnicate"])]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.split(": error: ")[1].strip(), err  # one line, no usage
    with pytest.raises(SystemExit):
        train(["--methd", "kd"])
    assert "unrecognized arguments: --methd; did you mean --method?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dump(["--skip-corupt"])
    assert "did you mean --skip-corrupt?" in capsys.readouterr().err


# --- properties: manifest fingerprint ---------------------------------------------------------------------------

ENTRIES = [(c, f"{n}.jpg") for c in ("tabby", "apple", "zebra") for n in ("b_2", "a_10", "a_9", "C", "x y")]


@SETTINGS
@given(order=st.permutations(ENTRIES))
def test_fingerprint_independent_of_creation_order(order, tmp_path_factory):
    root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    for c, name in order:  # folders and files created in a random order
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        (root / "train" / c / name).write_bytes(b"")
    m = build_manifest(root, "train", name="x")
    ref = sorted(ENTRIES)
    assert m.classes == ("apple", "tabby", "zebra")
    assert list(m.files) == [f"train/{c}/{n}" for c, n in ref]
    assert m.fingerprint == fingerprint(m.classes, [f"train/{c}/{n}" for c, n in ref],
                                        np.array([m.classes.index(c) for c, _ in ref]))
    # a file list with the same samples in any line order has the same fingerprint
    lst = root / "lst"
    lst.mkdir()
    (lst / "train_list.txt").write_text("".join(f"train/{c}/{n} {m.classes.index(c)}\n" for c, n in order))
    (lst / "classes.txt").write_text("\n".join(m.classes) + "\n")
    assert build_manifest(lst, "train").fingerprint == m.fingerprint


@SETTINGS
@given(data=st.data())
def test_fingerprint_sensitive_to_names_and_classes(data):
    files = [f"train/{c}/{n}" for c, n in sorted(ENTRIES)]
    classes = ("apple", "tabby", "zebra")
    labels = np.array([classes.index(f.split("/")[1]) for f in files])
    base = fingerprint(classes, files, labels)
    k = data.draw(st.integers(0, len(files) - 1))
    change = data.draw(st.sampled_from(["rename", "relabel", "drop", "classname"]))
    f2, l2, c2 = list(files), labels.copy(), classes
    if change == "rename":
        f2[k] = f2[k].replace(".jpg", "_.jpg")
    elif change == "relabel":
        l2[k] = (l2[k] + 1) % 3
    elif change == "drop":
        del f2[k]
        l2 = np.delete(l2, k)
    else:
        c2 = ("apple", "tabby", "zebra2")
    assert fingerprint(c2, f2, l2) != base


# --- properties: cache key -------------------------------------------------------------------------------------

HEX = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
TEACHER = st.fixed_dictionaries({"name": st.text(max_size=6), "arch": st.sampled_from(["resnet18", "resnet34",
                                                                                        "democnn_s"]),
                                 "weights": st.sampled_from(["DEFAULT", "none", "/ck/a.pt"]), "sha256": HEX,
                                 "init_seed": st.integers(0, 9)})
PRE = st.fixed_dictionaries({"name": st.sampled_from(["imagenet", "demo"]), "resize": st.integers(1, 512),
                             "crop": st.integers(1, 512), "mean": st.lists(st.floats(0, 1), min_size=3, max_size=3),
                             "std": st.lists(st.floats(0.01, 1), min_size=3, max_size=3), "teacher_amp": st.booleans()})
VIEWS = st.fixed_dictionaries({"policy": st.sampled_from(["center", "rrc", "rrc+flip"]), "num_views": st.integers(1, 9),
                               "seed": st.integers(0, 2**31)})
KEY_INPUTS = st.tuples(st.lists(TEACHER, min_size=1, max_size=3), HEX, PRE, VIEWS,
                       st.sampled_from(["float16", "float32"]))


def _shuffled(d, rng):
    if isinstance(d, dict):
        keys = list(d)
        rng.shuffle(keys)
        return {k: _shuffled(d[k], rng) for k in keys}
    if isinstance(d, list):
        return [_shuffled(x, rng) for x in d]
    return d


@SETTINGS
@given(inputs=KEY_INPUTS, seed=st.integers(0, 2**32 - 1))
def test_cache_key_independent_of_dict_order(inputs, seed):
    import random

    rng = random.Random(seed)
    teachers, fp, pre, views, dtype = inputs
    assert bank_key(teachers, fp, pre, views, dtype) == bank_key(
        _shuffled(teachers, rng), fp, _shuffled(pre, rng), _shuffled(views, rng), dtype)


@SETTINGS
@given(inputs=KEY_INPUTS, data=st.data())
def test_cache_key_sensitive_to_every_input(inputs, data):
    teachers, fp, pre, views, dtype = inputs
    base = bank_key(teachers, fp, pre, views, dtype)
    what = data.draw(st.sampled_from(["sha256", "weights", "arch", "init_seed", "preprocessing", "views", "dtype",
                                      "fingerprint", "teacher order", "extra teacher"]))
    t2 = [dict(t) for t in teachers]
    p2, v2, d2, fp2 = dict(pre), dict(views), dtype, fp
    k = data.draw(st.integers(0, len(t2) - 1))
    if what == "sha256":
        new = data.draw(HEX.filter(lambda h: h != t2[k]["sha256"]))
        t2[k]["sha256"] = new
    elif what == "weights":
        t2[k]["weights"] = t2[k]["weights"] + ".v2"
    elif what == "arch":
        t2[k]["arch"] = t2[k]["arch"] + "_x"
    elif what == "init_seed":
        t2[k]["init_seed"] += 1
    elif what == "preprocessing":
        key = data.draw(st.sampled_from(sorted(p2)))
        p2[key] = {"name": p2["name"] + "_", "resize": p2["resize"] + 1, "crop": p2["crop"] + 1,
                   "mean": [*p2["mean"][:2], p2["mean"][2] + 0.5], "std": [p2["std"][0] * 2, *p2["std"][1:]],
                   "teacher_amp": not p2["teacher_amp"]}[key]
    elif what == "views":
        key = data.draw(st.sampled_from(sorted(v2)))
        v2[key] = {"policy": v2["policy"] + "_", "num_views": v2["num_views"] + 1, "seed": v2["seed"] + 1}[key]
    elif what == "dtype":
        d2 = "float32" if dtype == "float16" else "float16"
    elif what == "fingerprint":
        fp2 = data.draw(HEX.filter(lambda h: h != fp))
    elif what == "teacher order":
        assume(len(t2) > 1 and t2[0] != t2[-1])
        t2 = t2[::-1]
        ident = [{k: t[k] for k in ("arch", "weights", "sha256", "init_seed")} for t in teachers]
        assume(ident != ident[::-1])
    else:
        t2.append(dict(t2[0]))
    assert bank_key(t2, fp2, p2, v2, d2) != base, what
