"""Content-addressed cache key of a bank and its default location.

The key hashes everything that determines the bank's values: teachers (arch + weights identity, including a
checkpoint's sha256), the manifest fingerprint, preprocessing, views and dtype. Same inputs -> same path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.bank.schema import SCHEMA_VERSION


def bank_key(teachers: list[dict[str, Any]], fingerprint: str, preprocessing: dict[str, Any],
             views: dict[str, Any], dtype: str) -> str:
    """sha256 hex of a canonical JSON of the inputs (teacher order matters: it is the T axis)."""
    payload = {
        "schema_version": SCHEMA_VERSION,
        "teachers": [{k: t[k] for k in sorted(t) if k in ("arch", "weights", "sha256", "init_seed")} for t in teachers],
        "fingerprint": fingerprint,
        "preprocessing": preprocessing,
        "views": views,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("KD_CACHE", "label_banks"))


def teacher_id(teachers: list[dict[str, Any]]) -> str:
    return "+".join(t["arch"] for t in teachers)


def default_bank_path(dataset: str, split: str, teachers: list[dict[str, Any]], key: str) -> Path:
    """``$KD_CACHE`` (default ``./label_banks``) ``/<dataset>-<split>/<teacher-id>-<key8>.zarr``."""
    return cache_root() / f"{dataset}-{split}" / f"{teacher_id(teachers)}-{key[:8]}.zarr"
