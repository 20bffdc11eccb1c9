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
