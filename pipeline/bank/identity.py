"""Bank identity, in one place: what determines a bank's values, its content-addressed key, its default path.

Both stages call :func:`bank_identity`: stage 1 to name the bank it writes, stage 2 to find the bank a
``--teacher`` flag refers to. The key hashes everything that determines the stored values: the teachers
(arch + weights identity, including a checkpoint's sha256 and a random init's seed), the manifest fingerprint,
the preprocessing, the view policy, the dtype and, for compact banks only, the compact format (a dense bank's key
is what it was before compact dumps existed, so existing caches stay valid). Same inputs -> same key -> same
path. See docs/DESIGN.md, "Bank identity and cache".
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.bank.schema import SCHEMA_VERSION, TOPK_TAILS
from pipeline.errors import UsageError
from pipeline.storage import name_for_path

VIEW_POLICIES = ("center", "rrc", "rrc+flip")
# Teacher-identity fields that enter the key ("name" is a display label and does not).
_KEYED_TEACHER_FIELDS = ("arch", "weights", "sha256", "init_seed")


def bank_key(teachers: Sequence[dict[str, Any]], fingerprint: str, preprocessing: dict[str, Any],
             views: dict[str, Any], dtype: str, compact: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> str:
    """sha256 hex of a canonical JSON of the inputs (teacher order matters: it is the T axis).

    ``compact``: :func:`compact_record` of a compact bank; None (dense) adds nothing to the payload. ``extra``:
    what only some banks have (class maps, stored embeddings), hashed when given so that other banks keep their
    keys."""
    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "teachers": [{k: t[k] for k in sorted(t) if k in _KEYED_TEACHER_FIELDS} for t in teachers],
        "fingerprint": fingerprint,
        "preprocessing": preprocessing,
        "views": views,
        "dtype": dtype,
        **(extra or {}),
    }
    if compact:
        payload["compact"] = compact
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def preprocessing_record(preset: Any, teacher_amp: bool = False) -> dict[str, Any]:
    """What a bank's attrs (and key) record about preprocessing: the preset's fields and whether the teachers
    ran under autocast. ``preset``: a :class:`pipeline.data.presets.Preprocess`."""
    return {**preset.to_dict(), "teacher_amp": bool(teacher_amp)}


def view_record(policy: str, num_views: int, seed: int, preset: Any) -> dict[str, Any]:
    """What a bank's attrs (and key) record about its views: the canonical policy string
    (:func:`pipeline.data.policy.parse_view_policy`), and for policies with stored parameters the ``view_params``
    column names; UsageError for an unknown or inconsistent policy (the old policies keep their old record, so
    their banks keep their keys)."""
    from pipeline.data.policy import parse_view_policy

    parsed = parse_view_policy(policy)
    if parsed.geometry == "center" and num_views != 1:
        raise UsageError("view policy 'center' has exactly one view; use --view-policy rrc or rrc+flip with --views K")
    rec: dict[str, Any] = {"policy": str(parsed), "num_views": num_views}
    if parsed.geometry != "center":
        rec.update({"seed": seed, "scale": list(preset.scale), "ratio": list(preset.ratio)})
    if parsed.stores_params:
        rec.update({"params_columns": parsed.columns(), "crop": int(preset.crop)})
    return rec


def compact_record(fmt: str, topk: int | None = None, samples: int | None = None,
                   sample_seed: int = 0) -> dict[str, Any] | None:
    """What a compact format adds to the key: None for ``dense``; ``{"format", "topk", "tail"}`` for ``topk``
    (the tail rule is part of what the stored values mean), plus ``samples`` and ``sample_seed`` for
    ``sampled``; ``{"format": "int8"}``."""
    if fmt == "dense":
        return None
    if fmt in ("topk", "sampled"):
        rec: dict[str, Any] = {"format": fmt, "topk": int(topk), "tail": TOPK_TAILS[0]}
        if fmt == "sampled":
            rec.update({"samples": int(samples), "sample_seed": int(sample_seed)})
        return rec
    return {"format": fmt}


def format_suffix(fmt: str, topk: int | None = None, samples: int | None = None, sample_seed: int = 0) -> str:
    """File-name suffix of a compact bank: ``""`` (dense), ``-top10``, ``-top5s5seed0`` (sampled), ``-int8``."""
    if fmt == "dense":
        return ""
    if fmt == "topk":
        return f"-top{int(topk)}"
    if fmt == "sampled":
        return f"-top{int(topk)}s{int(samples)}seed{int(sample_seed)}"
    return f"-{fmt}"


@dataclass(frozen=True)
class BankSpec:
    """Everything that determines a bank's values, except the dataset.

    ``teachers``: identity records (:meth:`pipeline.models.teachers.TeacherSpec.identity`), in T-axis order;
    ``preprocessing``: :func:`preprocessing_record` (plus ``per_teacher`` records when teachers differ);
    ``views``: :func:`view_record`; ``dtype``: the logits dtype (stored by dense banks, rounded to before
    encoding by compact ones); ``format``/``topk``/``samples``/``sample_seed``: ``dense``, ``topk`` with K,
    ``sampled`` with K, S and a seed, or ``int8``; ``class_maps``: per
    teacher, the teacher output index of each dataset class (None: one to one).
    """

    teachers: tuple[dict[str, Any], ...]
    preprocessing: dict[str, Any]
    views: dict[str, Any]
    dtype: str = "float16"
    format: str = "dense"
    topk: int | None = None
    samples: int | None = None  # sampled: S classes drawn per vector, and the draws' seed
    sample_seed: int = 0
    class_maps: tuple[tuple[int, ...] | None, ...] | None = None
    feature_dims: tuple[int, ...] | None = None  # the teachers' embedding widths, when embeddings are stored
    label_map: tuple[tuple[str, Any], ...] | None = None  # a map bank's pipeline.bank.labelmap.map_record items


@dataclass(frozen=True)
class BankIdentity:
    """A bank's key (sha256 hex) and its default location in the cache."""

    key: str
    default_path: Path


def cache_root() -> Path:
    """Where banks go by default: ``$KD_CACHE``, else ``$XDG_CACHE_HOME/offline-kd/label_banks``, else
    ``~/.cache/offline-kd/label_banks`` (a per-user cache, as torch hub and Hugging Face keep theirs; never a
    folder relative to the working directory)."""
    if os.environ.get("KD_CACHE"):
        return Path(os.environ["KD_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "offline-kd" / "label_banks"


@dataclass(frozen=True)
class CachedBank:
    """A bank found in the cache: its path and attrs (read from its ``zarr.json``, without opening arrays)."""

    path: str
    attrs: dict[str, Any]

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def fingerprint(self) -> str | None:
        return self.attrs.get("dataset", {}).get("fingerprint")


def cached_banks(root: Path | None = None) -> list[CachedBank]:
    """Every bank under the cache root (``<root>/<dataset>-<split>/*.zarr``), sorted by path. Found by content,
    not by folder name: callers match ``key`` or dataset fingerprint + teacher identity."""
    root = cache_root() if root is None else root
    found = []
    for meta in sorted(root.glob("*/*.zarr/zarr.json")) if root.is_dir() else []:
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue
        if isinstance(attrs, dict) and "schema_version" in attrs:
            found.append(CachedBank(str(meta.parent), attrs))
    return found


def teacher_match(t: dict[str, Any]) -> tuple:
    """What must agree for a bank's T slot to be a given teacher: the arch and, for a checkpoint, its content
    (sha256: the same file under another path or given relative to another directory is the same teacher), else
    the weights' name (a random init's seed is not compared)."""
    if t.get("sha256"):
        return t.get("arch"), "sha256", t.get("sha256")
    return t.get("arch"), t.get("weights"), None


def teacher_id(teachers: Sequence[dict[str, Any]]) -> str:
    """``resnet18+resnet34``: the teachers' archs, as used in bank file names (``timm/x.tag`` -> ``timm-x.tag``,
    ``pkg.mod:fn`` -> ``pkg.mod-fn``)."""
    return "+".join(name_for_path(t["arch"]) for t in teachers)


def default_bank_path(dataset: str, split: str, teachers: Sequence[dict[str, Any]], key: str,
                      suffix: str = "") -> Path:
    """``<cache_root>/<dataset>-<split>/<teacher-id>-<key8><suffix>.zarr`` (suffix: :func:`format_suffix`)."""
    return cache_root() / f"{dataset}-{split}" / f"{teacher_id(teachers)}-{key[:8]}{suffix}.zarr"


def bank_identity(spec: BankSpec, manifest: Any) -> BankIdentity:
    """Key and default path of the bank ``spec`` describes on ``manifest`` (a :class:`pipeline.data.Manifest`)."""
    extra: dict[str, Any] = {}
    if spec.class_maps:
        extra["class_maps"] = [list(m) if m is not None else None for m in spec.class_maps]
    if spec.feature_dims:
        extra["features"] = list(spec.feature_dims)
    if spec.label_map:
        extra["label_map"] = dict(spec.label_map)
    key = bank_key(spec.teachers, manifest.fingerprint, spec.preprocessing, spec.views, spec.dtype,
                   compact_record(spec.format, spec.topk, spec.samples, spec.sample_seed), extra or None)
    suffix = format_suffix(spec.format, spec.topk, spec.samples, spec.sample_seed)
    if spec.label_map:
        from pipeline.bank.labelmap import map_suffix

        suffix = map_suffix(dict(spec.label_map))
    return BankIdentity(key, default_bank_path(manifest.name, manifest.split, spec.teachers, key, suffix))
