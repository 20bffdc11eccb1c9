"""Dataset layouts -> Manifest: the sorted list of (relative path, class) that defines sample identity.

Sample index ``i`` is a sample's identity in every stage. Classes are in sorted-name order (torchvision's
``ImageFolder`` order, which pretrained teachers expect), files sorted within the split. The fingerprint
(sha256 over classes and the (path, label) list) is stored in every bank and checked by stage 2.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Manifest:
    """The samples of one split.

    Attributes:
        root: directory that ``files`` are relative to (for array datasets: the pickle directory).
        files: relative paths, index i is sample i. Array datasets use ``"<file>#<row>"``.
        labels: [N] int32 true classes.
        classes: class names; label k is ``classes[k]``.
        layout: ``imagefolder`` | ``filelist`` | ``cifar`` | ``shards``.
    """

    root: str
    files: tuple[str, ...]
    labels: np.ndarray = field(repr=False)
    classes: tuple[str, ...]
    name: str
    split: str
    layout: str

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.classes, self.files, self.labels)

    def describe(self) -> dict:
        """What a bank records about its dataset (checked field by field in stage 2)."""
        return {
            "name": self.name,
            "split": self.split,
            "layout": self.layout,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "fingerprint": self.fingerprint,
        }

    def subset(self, indices: np.ndarray) -> "Manifest":
        """A manifest over ``indices`` of this one (keeps classes)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Manifest(self.root, tuple(self.files[i] for i in idx), self.labels[idx], self.classes,
                        self.name, self.split, self.layout)


def fingerprint(classes: tuple[str, ...] | list[str], files: tuple[str, ...] | list[str], labels: np.ndarray) -> str:
    """sha256 over the class list and the ordered (relpath, label) list."""
    h = hashlib.sha256()
    h.update(("\n".join(classes) + "\n\n").encode())
    for f, y in zip(files, np.asarray(labels).tolist()):
        h.update(f"{f}\t{y}\n".encode())
    return h.hexdigest()


def _imagefolder(root: Path, split: str, name: str) -> Manifest:
    split_dir = root / split
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir())
    if not classes:
        raise UsageError(f"no class folders in {split_dir}")
    files: list[str] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        names = sorted(
            e.name for e in os.scandir(split_dir / c)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not names:
            raise UsageError(f"class folder {split_dir / c} holds no images")
        files.extend(f"{split}/{c}/{n}" for n in names)
        labels.extend([k] * len(names))
    return Manifest(str(root), tuple(files), np.asarray(labels, np.int32), tuple(classes), name, split, "imagefolder")


def _filelist(root: Path, split: str, name: str) -> Manifest:
    """``<split>_list.txt``: ``relpath label`` per line (as the WSLD seed's mk_img_list writes).

    Paths are relative to ``root`` (or to ``root/<split>`` when that is where they exist). Class names come
    from ``classes.txt`` (one per line, line k = label k) when present, else from the parent folder of each
    path when that is consistent, else ``str(label)``.
    """
    list_file = root / f"{split}_list.txt"
    files: list[str] = []
    labels: list[int] = []
    for ln, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UsageError(f"{list_file}:{ln}: expected 'relpath label', got {line!r}")
        files.append(parts[0])
        labels.append(int(parts[1]))
    if not files:
        raise UsageError(f"{list_file} lists no samples")
    if files and not (root / files[0]).exists() and (root / split / files[0]).exists():
        files = [f"{split}/{f}" for f in files]
    lab = np.asarray(labels, np.int32)
    if lab.min() < 0:
        raise UsageError(f"{list_file}: negative label")
    num_classes = int(lab.max()) + 1
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        classes = tuple(c.strip() for c in classes_file.read_text().splitlines() if c.strip())
        if len(classes) < num_classes:
            raise UsageError(f"{classes_file} names {len(classes)} classes but labels go up to {num_classes - 1}")
    else:
        parent = {}
        for f, y in zip(files, labels):
            parent.setdefault(y, set()).add(Path(f).parent.name)
        if all(len(v) == 1 for v in parent.values()) and len(parent) == num_classes:
            classes = tuple(next(iter(parent[k])) for k in range(num_classes))
        else:
            classes = tuple(str(k) for k in range(num_classes))
    order = sorted(range(len(files)), key=lambda i: files[i])
    files = [files[i] for i in order]
    lab = lab[order]
    return Manifest(str(root), tuple(files), lab, classes, name, split, "filelist")


def _cifar(root: Path, split: str, name: str) -> Manifest:
    """CIFAR-10/100 python pickles (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    if (root / "data_batch_1").is_file():
        batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta = pickle.loads((root / "batches.meta").read_bytes(), encoding="latin1")
        classes = tuple(meta["label_names"])
        key = "labels"
    else:
        batches = ["train"] if split == "train" else ["test"]
        meta = pickle.loads((root / "meta").read_bytes(), encoding="latin1")
        classes = tuple(meta["fine_label_names"])
        key = "fine_labels"
    files: list[str] = []
    labels: list[int] = []
    for b in batches:
        d = load_cifar_batch(root / b)
        files.extend(f"{b}#{i}" for i in range(len(d[key])))
        labels.extend(d[key])
    return Manifest(str(root), tuple(files), np.asarray(labels, np.int32), classes, name, split, "cifar")


def load_cifar_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def detect_layout(root: Path, split: str) -> str:
    if (root / "data_batch_1").is_file() or (root / "meta").is_file() and (root / "train").is_file():
        return "cifar"
    if (root / "shards.json").is_file():
        return "shards"
    if (root / f"{split}_list.txt").is_file():
        return "filelist"
    if (root / split).is_dir():
        return "imagefolder"
    raise UsageError(
        f"cannot find split '{split}' in {root}: expected {root / split}/<class>/*, {root / split}_list.txt, "
        "CIFAR pickles or packed shards"
    )


def build_manifest(root: str | Path, split: str = "train", name: str | None = None) -> Manifest:
    """Detect the layout of ``root`` and list split ``split`` (sorted classes, sorted files)."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"dataset root not found: {root}")
    if split not in ("train", "val", "test"):
        raise UsageError(f"unknown split '{split}'; valid: train, val, test")
    name = name or root.resolve().name
    try:
        layout = detect_layout(root, split)
        if layout == "cifar":
            return _cifar(root, split, name)
        if layout == "filelist":
            return _filelist(root, split, name)
        if layout == "shards":
            from pipeline.data.shards import shard_manifest  # packed tar shards (dataset-preparation issue)

            return shard_manifest(root, split, name)
        return _imagefolder(root, split, name)
    except OSError as e:  # unreadable folder or list file: name it in one line
        raise UsageError(f"cannot read dataset {root} ({split}): {' '.join(str(e).split())}") from None
