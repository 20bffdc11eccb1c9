"""Dataset layouts: how a split sits on disk, and everything the stages need to know about it.

Each layout is one class (a subclass of :class:`DatasetLayout`, registered in ``LAYOUTS``) that

- recognises a root (:meth:`~DatasetLayout.detect`) and lists a split as a :class:`~pipeline.data.manifest.Manifest`
  (:meth:`~DatasetLayout.build`: sorted classes, sorted files),
- feeds the DALI pipelines (:meth:`~DatasetLayout.dali_source`: decoded images and sample indices in exactly the
  order asked for),
- reads one sample for everything outside DALI (:meth:`~DatasetLayout.encoded`, the file bytes where
  :attr:`~DatasetLayout.encoded_images` says there are some; :meth:`~DatasetLayout.load_image`,
  :meth:`~DatasetLayout.load_tensor`, :meth:`~DatasetLayout.image_size`), and
- finds broken samples for both stages' corrupt-file handling (:meth:`~DatasetLayout.scan`, a cheap structural
  pre-scan, and :meth:`~DatasetLayout.find_corrupt`, a full decode from a position on), with the reason.

Adding a layout is one class here plus one ``LAYOUTS`` entry; no other module tests ``manifest.layout``.
DALI is imported only inside :meth:`~DatasetLayout.dali_source`.
"""

from __future__ import annotations

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.data import shards
from pipeline.data.manifest import IMAGE_EXTENSIONS, Manifest
from pipeline.errors import UsageError

SPLITS = ("train", "val", "test", "heldout")  # heldout: training images kept for hyperparameter choice


class DatasetLayout:
    """Base class: file-backed behaviour (each sample is an encoded image at ``root / files[i]``)."""

    name: ClassVar[str]
    packable: ClassVar[bool] = False  # ``python -m pipeline.data pack`` reads it
    default_preset: ClassVar[str] = "imagenet"  # the preprocessing preset of ``--preset auto``
    encoded_images: ClassVar[bool] = True  # :meth:`encoded` gives each sample's file bytes (not pixel arrays)

    # --- listing -----------------------------------------------------------------------------------------
    @classmethod
    def detect(cls, root: Path, split: str) -> bool:
        """Whether ``root`` holds split ``split`` in this layout."""
        raise NotImplementedError

    def build(self, root: Path, split: str, name: str) -> Manifest:
        """The manifest of split ``split`` (UsageError naming the file or folder on bad content)."""
        raise NotImplementedError

    # --- reading -----------------------------------------------------------------------------------------
    def encoded(self, manifest: Manifest, i: int) -> bytes:
        """The encoded bytes of sample ``i`` (OSError / UsageError when unreadable)."""
        return (Path(manifest.root) / manifest.files[i]).read_bytes()

    def describe_sample(self, manifest: Manifest, i: int) -> str:
        """Where sample ``i`` lives, for messages (a path, or a shard member)."""
        return str(Path(manifest.root) / manifest.files[i])

    def load_image(self, manifest: Manifest, i: int):
        """Sample ``i`` as a decoded RGB ``PIL.Image`` (raises on an undecodable file)."""
        from PIL import Image

        with Image.open(io.BytesIO(self.encoded(manifest, i))) as im:
            return im.convert("RGB")

    def load_tensor(self, manifest: Manifest, i: int):
        """Sample ``i`` decoded for the torch loader: uint8 [3, H, W] RGB, EXIF orientation applied (as DALI's
        decoder does); see :func:`decode_tensor`."""
        return decode_tensor(self.encoded(manifest, i))

    def image_size(self, manifest: Manifest, i: int) -> tuple[int, int]:
        """(H, W) of sample ``i`` as the loaders decode it, EXIF orientation applied (DALI and torchvision rotate
        JPEGs whose orientation tag is 5-8 by 90 degrees), from the header (no full decode)."""
        from PIL import Image

        with Image.open(io.BytesIO(self.encoded(manifest, i))) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
        return (w, h) if orientation in (5, 6, 7, 8) else (h, w)

    def dali_source(self, manifest: Manifest, order: np.ndarray, batch_size: int, decode_device: str,
                    name: str, hw_decoder_load: float = 0.65, scratch: str | None = None) -> tuple[Any, Any]:
        """DALI graph fragment (call inside a pipeline definition): (decoded HWC uint8 RGB images, index [1]
        int32) of the samples ``order``, in that order; the last batch is padded by repeating the last sample.
        ``hw_decoder_load``: the share of JPEGs ``mixed`` decoding gives the hardware decoder. ``scratch``: a
        folder that lives until the pipeline is built, for a file list (the cheap way to hand DALI a long order)."""
        from nvidia.dali import fn, types

        encoded, index = self._dali_encoded(manifest, order, name, scratch)
        return fn.decoders.image(encoded, device=decode_device, output_type=types.RGB,
                                 hw_decoder_load=hw_decoder_load), index

    def _dali_encoded(self, manifest: Manifest, order: np.ndarray, name: str,
                      scratch: str | None = None) -> tuple[Any, Any]:
        """``fn.readers.file`` over ``order``, the sample index as its label. Given a ``scratch`` folder, the
        order goes in a file list written there (``<path> <index>`` per line; DALI takes the last token as the
        label, so paths with spaces are fine): DALI builds a reader from it about 10x faster than from ``files=``
        and ``labels=`` lists (bench/dali_build.py: 2.2 s of 3.4 per build of an ImageNet-size order, paid by
        stage 2 every epoch). Paths a line cannot hold (a newline, edge whitespace) take the lists."""
        from nvidia.dali import fn

        listed = _file_list(manifest, order, os.path.join(scratch, f"{name}.txt")) if scratch else None
        where = ({"file_list": listed} if listed else
                 {"files": [manifest.files[i] for i in order], "labels": [int(i) for i in order]})
        return fn.readers.file(file_root=manifest.root, random_shuffle=False, pad_last_batch=True, name=name,
                               **where)

    # --- broken samples ------------------------------------------------------------------------------------
    def head_tail(self, manifest: Manifest, i: int) -> tuple[bytes, bytes]:
        """The first 16 and last 12 bytes of sample ``i``'s encoded image (b"", b"" when unreadable): one open,
        two ``pread``s (no Python file object: this runs once per file before every dump)."""
        try:
            fd = os.open(os.path.join(manifest.root, manifest.files[i]), os.O_RDONLY)
        except OSError:
            return b"", b""
        try:
            size = os.fstat(fd).st_size
            return os.pread(fd, 16, 0), os.pread(fd, 12, max(0, size - 12))
        except OSError:
            return b"", b""
        finally:
            os.close(fd)

    def scan(self, manifest: Manifest, order: np.ndarray, threads: int | None = None) -> dict[int, str]:
        """{position in ``order``: reason} of the samples no loader should see: empty, unreadable, not an image,
        a format DALI cannot decode (GIF, ...), or truncated (a JPEG/PNG without its end marker that a full PIL
        decode confirms). Cheap (two small reads per file, ~10 us of CPU; each of ``threads``, default
        min(8, 2 x the cores available), scans one contiguous slice); DALI 2.4's CPU decoder has been seen to
        crash, not raise, on some truncated JPEGs, so such files never reach it."""

        def problem(i: int) -> str | None:
            reason, confirm = structural_problem(*self.head_tail(manifest, int(i)))
            if reason is None or not confirm:
                return reason
            try:  # e.g. trailing bytes after a JPEG's end marker: only a failed full decode condemns a file
                self.load_image(manifest, int(i))
                return None
            except Exception:  # noqa: BLE001  (any decoder error condemns the file)
                return reason

        def part(lo: int, hi: int) -> dict[int, str]:
            found = {}
            for p in range(lo, hi):
                reason = problem(int(order[p]))
                if reason is not None:
                    found[p] = reason
            return found

        if threads is None:
            threads = min(8, 2 * len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 8)
        cuts = np.linspace(0, len(order), max(1, min(threads, len(order) // 256 + 1)) + 1).astype(int)
        with ThreadPoolExecutor(len(cuts) - 1) as ex:
            parts = list(ex.map(part, cuts[:-1], cuts[1:]))
        return {p: r for d in parts for p, r in d.items()}

    def find_corrupt(self, manifest: Manifest, order: np.ndarray, start: int,
                     known: set[int] | frozenset[int] = frozenset()) -> tuple[int, str] | None:
        """(position, reason) of the first sample at or after ``start`` in ``order`` that cannot be read, has a
        format DALI cannot decode, or fails a full decode; None if all decode. Samples in ``known`` (already
        skipped) are ignored."""
        for pos in range(start, len(order)):
            i = int(order[pos])
            if i in known:
                continue
            try:
                data = self.encoded(manifest, i)
            except Exception as e:  # noqa: BLE001  (unreadable: named with the error)
                return pos, f"unreadable ({' '.join(str(e).split())[:120]})"
            reason, confirm = structural_problem(data[:16], data[-12:])
            if reason is not None and not confirm:
                return pos, reason
            try:
                self.load_image(manifest, i)
            except Exception as e:  # noqa: BLE001
                return pos, reason or f"does not decode ({' '.join(str(e).split())[:120]})"
        return None


def decode_tensor(data: bytes):
    """Encoded image bytes -> uint8 [3, H, W] RGB, EXIF orientation applied. torchvision's decoders
    (libjpeg-turbo, libpng, libwebp); PIL for what they do not read (BMP, TIFF). torchvision 0.29 announces that
    ``torchvision.io`` decoding will move to TorchCodec; the warning is silenced here and PIL remains the
    fallback. Raises on undecodable bytes."""
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                apply_exif_orientation=True)
    except RuntimeError:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


# Image formats by signature, and those DALI's decoder reads (nvImageCodec: JPEG, PNG, BMP, TIFF, PNM, JPEG 2000,
# WebP). The torch loader reads GIF too, but both loaders must see the same samples, so GIF counts as undecodable.
DALI_FORMATS = ("jpeg", "png", "bmp", "tiff", "webp", "pnm", "jp2")


def image_format(head: bytes) -> str | None:
    """The image format of encoded bytes from their signature (first 12 bytes), or None."""
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] == b"\xff\x4f\xff\x51" or head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return "jp2"
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "pnm"
    if head[:4] == b"GIF8":
        return "gif"
    return None


def structural_problem(head: bytes, tail: bytes) -> tuple[str | None, bool]:
    """(reason, confirm) from an image's first and last bytes, no decode: an empty file, no known signature, a
    format DALI cannot decode, or a JPEG/PNG without its end marker. ``confirm`` says a full decode must confirm
    the reason (truncation markers can be followed by padding); the others are final."""
    if len(head) < 4:
        return "empty or unreadable file", False
    fmt = image_format(head)
    if fmt is None:
        return "not an image (no known signature)", False
    if fmt not in DALI_FORMATS:
        return (f"a {fmt.upper()} image, a format DALI cannot decode (convert it to JPEG or PNG)"), False
    if fmt == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)", True
    if fmt == "png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)", True
    return None, False


class ImageFolderLayout(DatasetLayout):
    """ImageNet-style folders: ``ROOT/<split>/<class>/<image>`` (classes and files sorted by name)."""

    name = "imagefolder"
    packable = True

    @classmethod
    def detect(cls, root: Path, split: str) -> bool:
        return (root / split).is_dir()

    def build(self, root: Path, split: str, name: str) -> Manifest:
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
        return Manifest(str(root), tuple(files), np.asarray(labels, np.int32), tuple(classes), name, split,
                        self.name)


class FileListLayout(DatasetLayout):
    """``ROOT/<split>_list.txt``: ``relpath label`` per line (as the WSLD seed's mk_img_list writes).

    Paths are relative to ``root`` (or to ``root/<split>`` when that is where they exist). Class names come
    from ``classes.txt`` (one per line, line k = label k) when present, else from the parent folder of each
    path when that is consistent, else ``str(label)``.
    """

    name = "filelist"
    packable = True

    @classmethod
    def detect(cls, root: Path, split: str) -> bool:
        return (root / f"{split}_list.txt").is_file()

    def build(self, root: Path, split: str, name: str) -> Manifest:
        list_file = root / f"{split}_list.txt"
        files, labels = _read_list(list_file)
        if not (root / files[0]).exists() and (root / split / files[0]).exists():
            files = [f"{split}/{f}" for f in files]
        lab = np.asarray(labels, np.int32)
        if lab.min() < 0:
            raise UsageError(f"{list_file}: negative label")
        classes = _list_classes(root, files, labels, int(lab.max()) + 1)
        order = sorted(range(len(files)), key=lambda i: files[i])
        return Manifest(str(root), tuple(files[i] for i in order), lab[order], classes, name, split, self.name)


def _read_list(list_file: Path) -> tuple[list[str], list[int]]:
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
    return files, labels


def _list_classes(root: Path, files: list[str], labels: list[int], num_classes: int) -> tuple[str, ...]:
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        classes = tuple(c.strip() for c in classes_file.read_text().splitlines() if c.strip())
        if len(classes) < num_classes:
            raise UsageError(f"{classes_file} names {len(classes)} classes but labels go up to {num_classes - 1}")
        return classes
    parent: dict[int, set[str]] = {}
    for f, y in zip(files, labels):
        parent.setdefault(y, set()).add(Path(f).parent.name)
    if all(len(v) == 1 for v in parent.values()) and len(parent) == num_classes:
        return tuple(next(iter(parent[k])) for k in range(num_classes))
    return tuple(str(k) for k in range(num_classes))


class CifarLayout(DatasetLayout):
    """CIFAR-10/100 python pickles (``cifar-10-batches-py`` / ``cifar-100-python``); samples ``<batch>#<row>``."""

    name = "cifar"
    default_preset = "cifar"
    encoded_images = False

    @classmethod
    def detect(cls, root: Path, split: str) -> bool:
        return (root / "data_batch_1").is_file() or (root / "meta").is_file() and (root / "train").is_file()

    def build(self, root: Path, split: str, name: str) -> Manifest:
        if split == "heldout":
            raise UsageError("CIFAR pickles hold a training and a test set only: there is no heldout split (use train "
                             "and val)")
        if (root / "data_batch_1").is_file():
            batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            classes = tuple(_unpickle(root / "batches.meta")["label_names"])
            key = "labels"
        else:
            batches = ["train"] if split == "train" else ["test"]
            classes = tuple(_unpickle(root / "meta")["fine_label_names"])
            key = "fine_labels"
        files: list[str] = []
        labels: list[int] = []
        for b in batches:
            d = _unpickle(root / b)
            files.extend(f"{b}#{i}" for i in range(len(d[key])))
            labels.extend(d[key])
        return Manifest(str(root), tuple(files), np.asarray(labels, np.int32), classes, name, split, self.name)

    def encoded(self, manifest: Manifest, i: int) -> bytes:
        raise UsageError(f"{self.describe_sample(manifest, i)} is a pixel array, not an encoded image")

    def load_image(self, manifest: Manifest, i: int):
        from PIL import Image

        return Image.fromarray(load_array_images(manifest)[i])

    def load_tensor(self, manifest: Manifest, i: int):
        import torch

        return torch.from_numpy(load_array_images(manifest)[i]).permute(2, 0, 1).contiguous()

    def image_size(self, manifest: Manifest, i: int) -> tuple[int, int]:
        return 32, 32

    def dali_source(self, manifest: Manifest, order: np.ndarray, batch_size: int, decode_device: str,
                    name: str, hw_decoder_load: float = 0.65, scratch: str | None = None) -> tuple[Any, Any]:
        from nvidia.dali import fn

        images, index = fn.external_source(
            source=_ArraySource(manifest, order, batch_size), num_outputs=2, batch=True,
        )  # no name: DALI refuses a named external_source with num_outputs
        return (images.gpu() if decode_device == "mixed" else images), index

    def scan(self, manifest: Manifest, order: np.ndarray, threads: int | None = None) -> dict[int, str]:
        return {}  # pixel arrays need no check

    def find_corrupt(self, manifest: Manifest, order: np.ndarray, start: int,
                     known: set[int] | frozenset[int] = frozenset()) -> tuple[int, str] | None:
        return None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


_ARRAY_CACHE: dict[str, np.ndarray] = {}


def load_array_images(manifest: Manifest) -> np.ndarray:
    """CIFAR pickles -> [N, 32, 32, 3] uint8 in manifest order (cached per root+split)."""
    key = f"{manifest.root}|{manifest.split}"
    if key not in _ARRAY_CACHE:
        by_file: dict[str, np.ndarray] = {}
        out = []
        for f in manifest.files:
            name, row = f.split("#")
            if name not in by_file:
                d = _unpickle(Path(manifest.root) / name)
                by_file[name] = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            out.append(by_file[name][int(row)])
        _ARRAY_CACHE[key] = np.ascontiguousarray(np.stack(out))
    return _ARRAY_CACHE[key]


class _ArraySource:
    """DALI external source for array datasets: HWC uint8 images and [1] int32 indices in ``order``, the last
    batch padded by repeating the last sample (like the file reader's ``pad_last_batch``)."""

    def __init__(self, manifest: Manifest, order: np.ndarray, batch_size: int):
        self.order = order
        self.batch_size = batch_size
        self.images = load_array_images(manifest)
        self.pos = 0

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self.pos >= len(self.order):
            idx = np.full(self.batch_size, self.order[-1])
        else:
            idx = self.order[self.pos:self.pos + self.batch_size]
            if len(idx) < self.batch_size:
                idx = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[-1])])
        self.pos += self.batch_size
        return [self.images[i] for i in idx], [np.array([i], np.int32) for i in idx]


class ShardsLayout(DatasetLayout):
    """Packed tar shards (``python -m pipeline.data pack``; format in :mod:`pipeline.data.shards`)."""

    name = "shards"

    @classmethod
    def detect(cls, root: Path, split: str) -> bool:
        return (root / shards.SHARDS_JSON).is_file()

    def build(self, root: Path, split: str, name: str) -> Manifest:
        return shards.shard_manifest(root, split, name)

    def encoded(self, manifest: Manifest, i: int) -> bytes:
        return shards.read_sample(manifest, i)

    def describe_sample(self, manifest: Manifest, i: int) -> str:
        return shards.describe_sample(manifest, i)

    def _dali_encoded(self, manifest: Manifest, order: np.ndarray, name: str,
                      scratch: str | None = None) -> tuple[Any, Any]:
        return shards.shard_reader(manifest, order, name=name)

    def head_tail(self, manifest: Manifest, i: int) -> tuple[bytes, bytes]:
        """Member bytes without reading whole members (truncation inside a pack is caught by the crc32 check)."""
        return shards.peek(manifest, i, 16, 12)


# --- DALI file lists ---------------------------------------------------------------------------------------
_LINES: dict[int, tuple[Manifest, np.ndarray | None]] = {}  # id(manifest) -> (it, its lines); the entry holds it


def _file_list(manifest: Manifest, order: np.ndarray, path: str) -> str | None:
    """Write the DALI file list of samples ``order`` (``<path> <index>`` per line) to ``path``; -> ``path``, or
    None when some path of the manifest cannot be written as a line. Each manifest's lines are made once per
    process (the last two manifests are kept: a run's train and val)."""
    hit = _LINES.get(id(manifest))
    if hit is None or hit[0] is not manifest:
        ok = not any("\n" in f or "\r" in f or f != f.strip() for f in manifest.files)
        lines = None
        if ok:  # an object array: fancy indexing picks an epoch's lines in C
            lines = np.empty(len(manifest.files), object)
            lines[:] = [os.fsencode(f"{f} {i}\n") for i, f in enumerate(manifest.files)]
        hit = (manifest, lines)
        while len(_LINES) >= 2:
            _LINES.pop(next(iter(_LINES)))
        _LINES[id(manifest)] = hit
    lines = hit[1]
    if lines is None:
        return None
    with open(path, "wb") as f:
        f.write(b"".join(lines[np.asarray(order, np.int64)].tolist()))
    return path


# Detection order matters: a pack or CIFAR root may also hold a split folder or a list.
LAYOUTS: dict[str, DatasetLayout] = {
    lay.name: lay for lay in (CifarLayout(), ShardsLayout(), FileListLayout(), ImageFolderLayout())
}


def layout_of(manifest: Manifest) -> DatasetLayout:
    """The layout object of ``manifest`` (its behaviour for readers, scans and DALI)."""
    try:
        return LAYOUTS[manifest.layout]
    except KeyError:
        raise UsageError(f"unknown dataset layout '{manifest.layout}'; valid: {', '.join(LAYOUTS)}") from None


def detect_layout(root: Path, split: str) -> DatasetLayout:
    for lay in LAYOUTS.values():
        if lay.detect(root, split):
            return lay
    raise UsageError(
        f"cannot find split '{split}' in {root}: expected {root / split}/<class>/*, {root / split}_list.txt, "
        "CIFAR pickles or packed shards"
    )


def build_manifest(root: str | Path, split: str = "train", name: str | None = None,
                   layout: str = "auto") -> Manifest:
    """List split ``split`` of the dataset at ``root`` (sorted classes, sorted files).

    ``layout``: ``auto`` detects it (CIFAR pickles, a pack, ``<split>_list.txt``, ``<split>/<class>/``, in that
    order), or one of ``LAYOUTS`` forces it. A file list found next to the folders it lists must list exactly
    their images: a stale list (images added or removed since it was written) is refused, naming the
    difference, instead of silently hiding files; ``--layout imagefolder`` / ``filelist`` chooses.
    Raises UsageError for a missing root, an unknown split or layout, or unreadable content.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"dataset root not found: {root}; give an ImageNet-style root (<split>/<class>/*.jpg), or "
                         "write the embedded one with python -m pipeline.data prepare-demo")
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    name = name or root.resolve().name
    try:
        if layout != "auto":
            lay = LAYOUTS.get(layout)
            if lay is None:
                raise UsageError(f"unknown layout '{layout}'; valid: auto, {', '.join(LAYOUTS)}")
            if not lay.detect(root, split):
                raise UsageError(f"--layout {layout}: {root} holds no split '{split}' in that layout")
            return lay.build(root, split, name)
        lay = detect_layout(root, split)
        manifest = lay.build(root, split, name)
        if lay.name == FileListLayout.name and ImageFolderLayout.detect(root, split):
            _check_list_matches_folders(root, split, name, manifest)
        return manifest
    except OSError as e:  # unreadable folder or list file: name it in one line
        raise UsageError(f"cannot read dataset {root} ({split}): {' '.join(str(e).split())}") from None


def _check_list_matches_folders(root: Path, split: str, name: str, listed: Manifest) -> None:
    """Refuse ``<split>_list.txt`` when it disagrees with the ``<split>/<class>/`` folders next to it."""
    try:
        folder = ImageFolderLayout().build(root, split, name)
    except UsageError:
        return  # not an ImageNet-style folder (flat, or other files): nothing to compare with
    have, want = set(folder.files), set(listed.files)
    if have == want:
        return
    unlisted, missing = sorted(have - want), sorted(want - have)
    parts = []
    if unlisted:
        parts.append(f"{len(unlisted)} image(s) in {root / split} are not listed (first: {unlisted[0]})")
    if missing:
        parts.append(f"{len(missing)} listed file(s) are not in the folders (first: {missing[0]})")
    raise UsageError(f"{root / f'{split}_list.txt'} disagrees with the folders it lists: {'; '.join(parts)}. "
                     f"Rewrite it (python -m pipeline.data list {root} -o {root}) or choose with --layout "
                     "imagefolder (the folders) or --layout filelist (the list)")
