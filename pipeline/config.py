"""Frozen dataclass configs: defaults, then a YAML file, then dotted overrides (``optim.lr=0.05``).

Unknown keys are errors (one line naming the key and the valid ones). The resolved config is written
next to every output so a run or a bank says exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from pipeline.errors import UsageError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 SafeLoader that also reads ``1e-3`` / ``5e-4`` (no dot) as floats, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _yaml_value(text: str, key: str, what: str) -> Any:
    """A ``[...]`` / ``{...}`` value given as text, parsed as YAML; UsageError naming the key when it is not."""
    try:
        return yaml_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"config key '{key}': {text!r} is not a YAML {what} ({first})") from None


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise UsageError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UsageError as e:
                last = e
        raise last or UsageError(f"config key '{key}': bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise UsageError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str):
            value = _yaml_value(value, key, "list") if value.strip().startswith("[") else [
                v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, key) for v in value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = _yaml_value(value, key, "mapping") or {}
        if not isinstance(value, Mapping):
            raise UsageError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise UsageError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"config key '{key}': expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"config key '{key}': expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):  # nan / inf (YAML .nan, 1e400) are not integers either
            raise UsageError(f"config key '{key}': expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping; unknown keys raise UsageError.

    A dataclass may declare ``RENAMED_KEYS: ClassVar[dict[str, str]]`` (old key -> new key): an old key is a
    one-line error naming the new one, never silently ignored.
    """
    if not isinstance(data, Mapping):
        raise UsageError(f"config {prefix or 'root'}: expected a mapping, got {type(data).__name__}")
    types_ = _field_types(cls)
    renamed = getattr(cls, "RENAMED_KEYS", {})
    for k in data:
        if k in renamed:
            raise UsageError(f"config key '{prefix}{k}' is now '{prefix}{renamed[k]}'")
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise UsageError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys: {', '.join(prefix + k for k in types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"config {prefix or 'root'}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=0.05", "epochs=3"]`` -> [("optim.lr", 0.05), ("epochs", 3)] (values parsed as YAML)."""
    out = []
    for item in items:
        if "=" not in item:
            raise UsageError(f"override '{item}' is not of the form key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise UsageError(f"override '{item}' has an empty key")
        try:
            val = yaml_load(v) if v != "" else ""
        except yaml.YAMLError:
            val = v
        out.append((k, val))
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or not UTF-8 text
        raise UsageError(f"cannot read config file {p}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping at top level")
    return data


def resolve(
    cls: type[T],
    config_file: str | Path | None = None,
    cli: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Defaults < YAML file < CLI flags (dotted keys, ``None`` = not given) < dotted overrides."""
    data: dict[str, Any] = load_yaml(config_file) if config_file else {}
    for k, v in (cli or {}).items():
        if v is not None:
            _set_dotted(data, k, v)
    for k, v in parse_overrides(overrides):
        _set_dotted(data, k, v)
    return from_dict(cls, data)


def default_of(cls: type, key: str) -> Any:
    """The default value of dotted ``key`` of dataclass ``cls`` (``"optim.lr"``), for help texts."""
    head, _, rest = key.partition(".")
    f = {f.name: f for f in dataclasses.fields(cls)}[head]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if rest:
        return default_of(type(value), rest)
    if isinstance(value, tuple):
        return list(value) if value else "none"
    return "none" if value in ("", None) else value


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --- key declarations -------------------------------------------------------------------------------------------
# Each config key is declared once, on its dataclass field (:func:`key`): type and default (the annotation and the
# default), help, CLI flags and aliases, what --resume does when it changes, whether --test-only uses it. The entry
# points' parsers (:func:`add_arguments`), the resume check and the --test-only warning are generated from these
# declarations (:func:`keys_where`), so forgetting one of them cannot silently change what a flag or --resume does.

RESUME_MATCH = "match"  # defines the run: --resume refuses another value
RESUME_APPLY = "apply"  # may change on --resume: applied from the first resumed step and logged
RESUME_FREE = "free"  # how the run is executed or logged (workers, device, output): anything goes
_RESUME_KINDS = (RESUME_MATCH, RESUME_APPLY, RESUME_FREE)


@dataclasses.dataclass(frozen=True)
class Cli:
    """A key's command-line form: ``flags`` (the first is the main one; none = ``key=value`` only), ``action``
    (``store_true``, ``store_false``, ``append`` for repeatable flags), ``choices``, ``type`` (a converter
    instead of the annotation's type), ``group`` (help section), ``default_text`` (instead of the default)."""

    flags: tuple[str, ...] = ()
    action: str | None = None
    choices: tuple[Any, ...] | None = None
    type: Any = None
    group: str = ""
    default_text: str | None = None


def key(default: Any = dataclasses.MISSING, *, help: str, flags: Sequence[str] = (), resume: str = RESUME_FREE,
        test_only: bool = False, default_factory: Any = dataclasses.MISSING, action: str | None = None,
        choices: Sequence[Any] | None = None, type: Any = None, group: str = "",
        default_text: str | None = None) -> Any:
    """A dataclass field declaring a config key (see the section comment above). ``resume``: ``match``,
    ``apply`` or ``free``; ``test_only``: whether stage 2's ``--test-only`` reads it."""
    if resume not in _RESUME_KINDS:
        raise ValueError(f"resume must be one of {_RESUME_KINDS}, got {resume!r}")
    meta = {"help": help, "cli": Cli(tuple(flags), action, tuple(choices) if choices else None, type, group,
                                      default_text), "resume": resume, "test_only": test_only}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def declared_keys(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotated type) of every key of ``cls``, nested dataclasses walked (the nested field
    itself is listed too)."""
    out = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        out.append((prefix + f.name, f, tp))
        if dataclasses.is_dataclass(tp):
            out += declared_keys(tp, prefix + f.name + ".")
    return out


def undeclared_keys(cls: type) -> list[str]:
    """Keys of ``cls`` without a declaration (:func:`key`): a test keeps this empty."""
    return [k for k, f, _ in declared_keys(cls) if "help" not in f.metadata]


def keys_where(cls: type, *, resume: str | None = None, test_only: bool | None = None) -> tuple[str, ...]:
    """Dotted keys whose declaration has this ``resume`` kind / ``test_only`` flag (nested dataclass fields are
    containers: their own keys are listed instead)."""
    return tuple(k for k, f, tp in declared_keys(cls) if not dataclasses.is_dataclass(tp)
                 and (resume is None or f.metadata.get("resume") == resume)
                 and (test_only is None or f.metadata.get("test_only") == test_only))


def _scalar_type(tp: Any) -> Any:
    """int / float / str of an annotation (``int | None`` -> int, ``tuple[str, ...]`` -> str)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _scalar_type(next(a for a in args if a is not type(None)))
    if origin in (tuple, list):
        return _scalar_type(args[0]) if args else str
    return tp if tp in (int, float, str) else str


def add_arguments(parser: Any, cls: type, groups: dict[str, Any] | None = None,
                  names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Add every declared flag of ``cls`` to ``parser`` (an argparse parser), ``dest`` = the dotted key, values
    ``None`` when not given (so :func:`resolve` layers them over the YAML file). ``groups``: argument groups by
    name, created in order of first use when missing; returned (with the new ones) for flags that are not keys.
    ``names``: values of ``{placeholders}`` in help texts (registries listed when the parser is built)."""
    groups = {} if groups is None else groups
    for dotted, f, tp in declared_keys(cls):
        cli: Cli = f.metadata.get("cli") or Cli()
        if not cli.flags:
            continue
        if cli.group and cli.group not in groups:
            groups[cli.group] = parser.add_argument_group(cli.group)
        target = groups.get(cli.group, parser)
        default = cli.default_text if cli.default_text is not None else default_of(cls, dotted)
        text = f.metadata["help"].format(**names) if names else f.metadata["help"]
        kwargs: dict[str, Any] = {"dest": dotted, "help": f"{text} (default: {default})"}
        if cli.action in ("store_true", "store_false"):
            kwargs.update(action=cli.action, default=None)
        else:
            if not cli.choices:
                kwargs["metavar"] = dotted.rsplit(".", 1)[-1].upper()
            if cli.action == "append":
                kwargs["action"] = "append"
            kwargs["type"] = cli.type or _scalar_type(tp)
            if cli.choices:
                kwargs["choices"] = list(cli.choices)
        target.add_argument(*cli.flags, **kwargs)
    return groups
