"""The manifest: the sorted list of (relative path, class) that defines sample identity in both stages.

Sample index ``i`` is a sample's identity in every stage. Classes are in sorted-name order (torchvision's
``ImageFolder`` order, which pretrained teachers expect), files sorted within the split. The fingerprint
(sha256 over classes and the (path, label) list) is stored in every bank and checked by stage 2.

How a dataset sits on disk (folders, file lists, CIFAR pickles, tar shards) is a *layout*:
:mod:`pipeline.data.layouts` turns each into a Manifest. This module knows no layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Manifest:
    """The samples of one split.

    Attributes:
        root: directory that ``files`` are relative to (array datasets: the pickle directory; packs: the pack).
        files: relative paths, index i is sample i. Array datasets use ``"<file>#<row>"``.
        labels: [N] int32 true classes.
        classes: class names; label k is ``classes[k]``.
        layout: the layout's registered name (``imagefolder``, ``filelist``, ``cifar``, ``shards``); its
            behaviour is ``pipeline.data.layouts.layout_of(manifest)``.
        transform: canonical JSON of a re-encoding applied to the source images ('' = original bytes), hashed
            into the fingerprint when set (packs made with ``--resize-shorter`` / ``--quality``).
    """

    root: str
    files: tuple[str, ...]
    labels: np.ndarray = field(repr=False)
    classes: tuple[str, ...]
    name: str
    split: str
    layout: str
    transform: str = ""

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        return transformed_fingerprint(fingerprint(self.classes, self.files, self.labels), self.transform)

    def describe(self) -> dict:
        """What a bank records about its dataset (checked field by field in stage 2)."""
        d = {
            "name": self.name,
            "split": self.split,
            "layout": self.layout,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "fingerprint": self.fingerprint,
        }
        if self.transform:
            d["pack_transform"] = json.loads(self.transform)
        return d

    def subset(self, indices: np.ndarray) -> "Manifest":
        """A manifest over ``indices`` of this one (keeps classes)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(self, files=tuple(self.files[i] for i in idx), labels=self.labels[idx])


def fingerprint(classes: tuple[str, ...] | list[str], files: tuple[str, ...] | list[str], labels: np.ndarray) -> str:
    """sha256 over the class list and the ordered (relpath, label) list."""
    h = hashlib.sha256()
    h.update(("\n".join(classes) + "\n\n").encode())
    for f, y in zip(files, np.asarray(labels).tolist()):
        h.update(f"{f}\t{y}\n".encode())
    return h.hexdigest()


def canonical_transform(transform: dict | None) -> str:
    """The canonical JSON of a re-encoding record ('' for none)."""
    return json.dumps(transform, sort_keys=True, separators=(",", ":")) if transform else ""


def transformed_fingerprint(source_fingerprint: str, transform: str) -> str:
    """The fingerprint of re-encoded images: the source's when bytes are original, else sha256(source, transform)."""
    if not transform:
        return source_fingerprint
    return hashlib.sha256(f"{source_fingerprint}\npack:{transform}".encode()).hexdigest()
