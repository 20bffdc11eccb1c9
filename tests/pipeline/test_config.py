"""Config resolution (issue 2, point 10): defaults < YAML < CLI flags < dotted overrides, unknown keys and bad
types are one-line UsageErrors, and the resolved config is stored in the bank."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.config import from_dict, parse_overrides, resolve, save_yaml, to_dict
from pipeline.errors import UsageError
from stage1_teacher_logits.dump import DumpConfig


@dataclass(frozen=True)
class Optim:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False


@dataclass(frozen=True)
class Run:
    epochs: int = 10
    name: str = "run"
    optim: Optim = field(default_factory=Optim)
    milestones: tuple[int, ...] = (30, 60)
    out: str | None = None


def _yaml(tmp_path: Path, data) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_precedence_defaults_yaml_cli_overrides(tmp_path: Path):
    f = _yaml(tmp_path, {"epochs": 20, "name": "from_yaml", "optim": {"lr": 0.5, "momentum": 0.8}})
    assert resolve(Run) == Run()
    c = resolve(Run, f)
    assert (c.epochs, c.name, c.optim.lr, c.optim.momentum) == (20, "from_yaml", 0.5, 0.8)
    c = resolve(Run, f, {"epochs": 30, "optim.lr": 0.25, "name": None})  # None = flag not given
    assert (c.epochs, c.name, c.optim.lr, c.optim.momentum) == (30, "from_yaml", 0.25, 0.8)
    c = resolve(Run, f, {"epochs": 30, "optim.lr": 0.25}, ["optim.lr=0.05", "epochs=3", "optim.nesterov=true"])
    assert (c.epochs, c.optim.lr, c.optim.momentum, c.optim.nesterov) == (3, 0.05, 0.8, True)
    assert c.milestones == (30, 60)
    c = resolve(Run, None, None, ["milestones=[5, 7]", "out=none"])
    assert c.milestones == (5, 7) and c.out is None


def test_unknown_keys_list_valid_keys(tmp_path: Path):
    with pytest.raises(UsageError) as e:
        resolve(Run, _yaml(tmp_path, {"epoch": 3}))
    msg = str(e.value)
    assert "'epoch'" in msg and "epochs" in msg and "optim" in msg and "milestones" in msg and "\n" not in msg
    with pytest.raises(UsageError) as e:
        resolve(Run, None, None, ["optim.beta=0.9"])
    assert "'optim.beta'" in str(e.value) and "optim.lr" in str(e.value) and "optim.nesterov" in str(e.value)


@pytest.mark.parametrize("override, match", [
    ("epochs=abc", "epochs"),
    ("epochs=2.5", "integer"),
    ("epochs=true", "integer"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.nesterov=maybe", "true/false"),
    ("optim=3", "mapping"),
    ("name=[1, 2]", "string"),
    ("nokey", "key=value"),
    ("=3", "empty key"),
    ("milestones=[1", r"'milestones': '\[1' is not a YAML list"),
])
def test_bad_values_are_usage_errors(override: str, match: str):
    with pytest.raises(UsageError, match=match):
        resolve(Run, None, None, [override])


def test_malformed_list_and_mapping_overrides_are_one_line_exit_2(tmp_path: Path, capsys):
    """``sched.milestones=[1`` or ``loss={T: 4`` on either stage's command line: one line naming the key, exit 2
    (they were YAML parser tracebacks)."""
    from pipeline.dump_logits import main as dump
    from pipeline.train_student import main as train

    for main, argv, key in ((train, ["--method", "kd", "sched.milestones=[1"], "sched.milestones"),
                            (train, ["--method", "kd", "loss={T: 4"], "loss"),
                            (dump, ["--teacher", "democnn_s", "--data", str(tmp_path), "teacher=[a"], "teacher")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"config key '{key}'" in err[0] and "is not a YAML" in err[0], err


def test_yaml_file_errors(tmp_path: Path):
    with pytest.raises(UsageError, match="not found"):
        resolve(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        resolve(Run, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        resolve(Run, lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert resolve(Run, empty) == Run()


def test_roundtrip_to_dict_yaml(tmp_path: Path):
    c = resolve(Run, None, None, ["optim.lr=0.01", "milestones=[1,2,3]"])
    d = to_dict(c)
    assert d == {"epochs": 10, "name": "run", "optim": {"lr": 0.01, "momentum": 0.9, "nesterov": False},
                 "milestones": [1, 2, 3], "out": None}
    save_yaml(c, tmp_path / "c.yaml")
    assert from_dict(Run, yaml.safe_load((tmp_path / "c.yaml").read_text())) == c
    assert parse_overrides(["a.b=0.5", "s=hello", "e="]) == [("a.b", 0.5), ("s", "hello"), ("e", "")]


def test_dump_cli_resolution_stored_in_bank(tmp_path: Path, image_tree: Path, capsys):
    """YAML < CLI flags < overrides through ``pipeline.dump_logits``; bank attrs['config'] is the resolved config."""
    import zarr

    from pipeline.dump_logits import main

    cfg_file = _yaml(tmp_path, {"teacher": ["democnn_s"], "weights": ["none"], "preset": "tiny",
                                "batch_size": 6, "rows_per_chunk": 12, "dtype": "float32", "workers": 1})
    out = tmp_path / "bank.zarr"
    rc = main(["--config", str(cfg_file), "--data", str(image_tree), "--batch-size", "3", "--out", str(out),
               "rows_per_chunk=6", "seed=4"])
    assert rc == 0, capsys.readouterr().err
    g = zarr.open_group(str(out), mode="r")
    stored = dict(g.attrs)["config"]
    expected = to_dict(DumpConfig(teacher=("democnn_s",), weights=("none",), data=str(image_tree), preset="tiny",
                                  batch_size=3, rows_per_chunk=6, dtype="float32", workers=1, out=str(out), seed=4,
                                  loader=dict(g.attrs)["loader"]))
    assert stored == expected and stored["loader"] in ("dali", "torch")  # auto is recorded resolved
    assert g["logits"].dtype == "float32" and g["logits"].chunks[0] == 6 and dict(g.attrs)["rows_per_chunk"] == 6
    assert from_dict(DumpConfig, stored).batch_size == 3  # the stored config resolves back


def test_dump_cli_config_errors_exit_2(tmp_path: Path, image_tree: Path, capsys):
    from pipeline.dump_logits import main

    out = tmp_path / "never.zarr"
    base = ["--teacher", "democnn_s", "--weights", "none", "--data", str(image_tree), "--preset", "tiny",
            "--out", str(out)]
    rc = main(base + ["--config", str(_yaml(tmp_path, {"batchsize": 4}))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "'batchsize'" in err and "batch_size" in err and "rows_per_chunk" in err
    rc = main(base + ["batch_size=many"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "batch_size" in err and "integer" in err
    rc = main(base + ["dtype=float64"])
    assert rc == 2 and "float64" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("old, new", [("sched.min_lr", "sched.min_lr_factor"),
                                      ("sched.warmup_start", "sched.warmup_start_factor"), ("labels", "banks")])
def test_renamed_keys_name_the_new_key(tmp_path: Path, old: str, new: str):
    """A renamed key is a one-line error naming its new name, from an override and from a YAML recipe."""
    from stage2_student_train.config import TrainConfig

    with pytest.raises(UsageError, match=rf"config key '{old}' is now '{new}'"):
        resolve(TrainConfig, overrides=[f"{old}=0.1"])
    parts = old.split(".")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({parts[0]: {parts[1]: 0.1}} if len(parts) == 2 else {old: ["b.zarr"]}))
    with pytest.raises(UsageError, match=rf"'{old}' is now '{new}'"):
        resolve(TrainConfig, recipe)
    cfg = resolve(TrainConfig, overrides=[f"{new}=[x.zarr]" if new == "banks" else f"{new}=0.25"])
    assert cfg.banks == ("x.zarr",) if new == "banks" else getattr(cfg.sched, new.split(".")[1]) == 0.25


def test_every_config_key_is_declared_once():
    """Issue 21, point 6: each key of both stages carries its declaration (help, flags, resume kind, test-only);
    the parsers, the resume check and the --test-only warning are generated from them."""
    import dataclasses

    from pipeline.config import Cli, declared_keys, key, keys_where, undeclared_keys
    from pipeline.dump_logits import build_parser as dump_parser
    from pipeline.train_student import build_parser as train_parser
    from stage1_teacher_logits.dump import DumpConfig
    from stage2_student_train.checkpoint import CHANGEABLE, RUN_DEFINING
    from stage2_student_train.config import TrainConfig

    assert undeclared_keys(TrainConfig) == [] and undeclared_keys(DumpConfig) == []

    @dataclasses.dataclass(frozen=True)
    class Forgotten:
        declared: int = key(1, help="a declared key")
        plain: int = 2

    assert undeclared_keys(Forgotten) == ["plain"]  # the check catches a key added without a declaration
    # every flag of a key is the parser's, with the key as its destination; the parser has no other flags but
    # the few that are not one key
    for cls, parser, extra in ((TrainConfig, train_parser(), {"label_smoothing", "lr_scheduler", "resume", "config",
                                                              "verbose", "help"}),
                               (DumpConfig, dump_parser(), {"config", "verbose", "help"})):
        by_dest = {a.dest: a for a in parser._actions if a.option_strings}
        for dotted, f, _ in declared_keys(cls):
            cli: Cli = f.metadata["cli"]
            if cli.flags:
                assert by_dest[dotted].option_strings == list(cli.flags), dotted
        assert set(by_dest) - {k for k, f, _ in declared_keys(cls) if f.metadata["cli"].flags} == extra
    # the resume check reads the declarations; every leaf key has exactly one resume kind
    assert set(RUN_DEFINING) == set(keys_where(TrainConfig, resume="match")) and "optim.name" in RUN_DEFINING
    assert "optim.lr" in CHANGEABLE and "workers" not in RUN_DEFINING + CHANGEABLE
    leaves = keys_where(TrainConfig)
    assert sorted(leaves) == sorted(keys_where(TrainConfig, resume="match") + keys_where(TrainConfig, resume="apply")
                                    + keys_where(TrainConfig, resume="free"))
