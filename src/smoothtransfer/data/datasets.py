"""Datasets as in-memory uint8 tensors: built-in zips, any ImageFolder (directory or zip), torchvision.

Every dataset is an :class:`ImageDataset` holding all images as one uint8 tensor ``(N,C,H,W)``; small
32x32 datasets fit easily (tiny-imagenet-32 train is 307 MB) and batches can then be gathered on any
device without a worker pool. Decoding JPEGs is the slow part, so a decoded split is cached as an
``.npz`` under ``$SMOOTHTRANSFER_CACHE`` (default ``~/.cache/smoothtransfer``), keyed by the source's
absolute path, size and mtime.

Class order is always the sorted class-folder names (torchvision's ``ImageFolder`` convention), and
images within a class are in sorted file-name order, so indices are stable across machines.

Why one file (~700 lines): every dataset kind (built-in zips, ImageFolder directories and zips,
torchvision) goes through the same member listing, decoding, cache key and atomic ``.npz`` cache; the kinds
differ by a few dozen lines each, and :func:`get_dataset` is the one entry point.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smoothtransfer.errors import UserError
from smoothtransfer.registry import Registry
from smoothtransfer.utils import progress_enabled

logger = logging.getLogger(__name__)

DATA_ENV = "SMOOTHTRANSFER_DATA"
CACHE_ENV = "SMOOTHTRANSFER_CACHE"
# Bump when the cached array layout or the decoding rules change, so stale caches are not reused.
CACHE_VERSION = 2
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Folder / zip names that mark a directory as a container of splits rather than one ImageFolder.
KNOWN_SPLITS = ("train", "val", "valid", "validation", "test")

_NO_DATA_HINT = (
    "pass --data-root DIR or set SMOOTHTRANSFER_DATA to a folder holding cifar10/, tiny-imagenet-32/, "
    "eurosat-32/ (zips of ImageFolder trees); online users can use --dataset torchvision-cifar10 "
    "with --download"
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset; ``mean``/``std`` are per channel, in [0,1] units."""

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple
    std: tuple


class ImageDataset(torch.utils.data.Dataset):
    """All images of one split in memory.

    Attributes:
        images: uint8 ``(N,C,H,W)``.
        targets: int64 ``(N,)``, values in ``[0, len(classes))``.
        classes: class-folder names, index = label.
        info: the dataset's :class:`DatasetInfo`.
        class_names: human-readable names, same order as ``classes`` (defaults to ``classes``).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str], info: DatasetInfo,
                 class_names: Sequence[str] | None = None) -> None:
        images = torch.as_tensor(images)
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")
        self.images = images
        self.targets = targets
        self.classes = list(classes)
        self.info = info
        self.class_names = list(class_names) if class_names is not None else list(self.classes)
        if len(self.class_names) != len(self.classes):
            raise ValueError("class_names must have one entry per class")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """``(float32 (C,H,W) in [0,1], label)``."""
        return self.images[i].float().div_(255), int(self.targets[i])

    def get_batch(self, indices, device: torch.device | str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch without a DataLoader: float32 ``(B,C,H,W)`` in [0,1] and int64 ``(B,)`` on ``device``.

        The uint8 images are moved before the float conversion, so host-to-device traffic is 4x smaller.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[idx].to(device, non_blocking=True).float().div_(255)
        return x, self.targets[idx].to(device, non_blocking=True)

    def subset(self, indices) -> ImageDataset:
        """A new dataset with the images at ``indices`` (list, array or LongTensor), same classes and info."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if idx.dim() != 1:
            raise UserError(f"subset indices must be 1-D, got shape {tuple(idx.shape)}")
        if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise UserError(f"subset index out of range for a dataset of {len(self)} images")
        return ImageDataset(self.images[idx], self.targets[idx], self.classes, self.info, self.class_names)

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return (f"ImageDataset({self.info.name!r}, n={len(self)}, classes={len(self.classes)}, "
                f"shape=({c},{h},{w}))")


# --------------------------------------------------------------------------------------------- data root


def _repo_data_root() -> Path | None:
    """``<repo>/../shared/datasets`` for a source checkout (the folder holding pyproject.toml), else None."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            cand = parent.parent / "shared" / "datasets"
            return cand if cand.is_dir() else None
    return None


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the built-in datasets.

    Order: ``root`` if given, else ``$SMOOTHTRANSFER_DATA``, else ``../shared/datasets`` relative to the
    current directory, else ``../shared/datasets`` beside the source checkout. A given root that does not
    exist is an error rather than a silent fall-through, so a typo is never masked by another data set.
    """
    if root is not None and str(root) != "":
        p = Path(root).expanduser()
        if not p.is_dir():
            raise UserError(f"data root '{root}' is not a directory")
        return p.resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise UserError(f"{DATA_ENV}='{env}' is not a directory")
        return p.resolve()
    cand = Path.cwd().parent / "shared" / "datasets"
    if cand.is_dir():
        return cand.resolve()
    repo = _repo_data_root()
    if repo is not None:
        return repo.resolve()
    raise UserError(f"no data root found: {_NO_DATA_HINT}")


def cache_dir() -> Path:
    """``$SMOOTHTRANSFER_CACHE`` or ``~/.cache/smoothtransfer``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "smoothtransfer"


# ------------------------------------------------------------------------------------- ImageFolder reading


@dataclass(frozen=True)
class _Source:
    """One ImageFolder tree: a directory, or a zip with an optional inner prefix like ``train/``."""

    path: Path  # absolute
    prefix: str = ""  # only for zips; "" or "dir/"

    @property
    def is_zip(self) -> bool:
        return self.path.is_file()  # a file source is always read as a zip; directories are walked

    def __str__(self) -> str:
        return f"{self.path}:{self.prefix}" if self.prefix else str(self.path)


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"cannot read zip '{path}': {e}") from None


def _zip_members(zf: zipfile.ZipFile, prefix: str) -> list[tuple[str, str]]:
    """``[(class, member name)]`` for images at ``prefix<class>/.../<file>``, sorted by member name."""
    out = []
    for name in zf.namelist():
        if not name.startswith(prefix) or name.endswith("/") or "__MACOSX/" in name or not _is_image(name):
            continue
        rel = name[len(prefix):]
        if "/" not in rel:  # files at the top level belong to no class (ImageFolder ignores them too)
            continue
        out.append((rel.split("/", 1)[0], name))
    out.sort(key=lambda t: t[1])
    return out


def _zip_wrapper_prefix(zf: zipfile.ZipFile) -> str:
    """``"wrapper/"`` if every image is under one top folder at depth >= 3 (a zipped folder), else ``""``."""
    tops, shallow = set(), False
    for name in zf.namelist():
        if name.endswith("/") or "__MACOSX/" in name or not _is_image(name):
            continue
        tops.add(name.split("/", 1)[0])
        shallow |= name.count("/") < 2
    return f"{next(iter(tops))}/" if len(tops) == 1 and not shallow else ""


def _dir_members(root: Path) -> list[tuple[str, str]]:
    """``[(class, absolute file path)]`` for images under ``root/<class>/``, sorted like ImageFolder."""
    out = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
            dirnames.sort()
            out.extend((cls_dir.name, os.path.join(dirpath, f)) for f in sorted(filenames) if _is_image(f))
    return out


def _listed_classes(src: _Source) -> list[str]:
    """Sorted class-folder names holding at least one image, from the zip directory or folder listing."""
    if src.is_zip:
        with _open_zip(src.path) as zf:
            return sorted({c for c, _ in _zip_members(zf, src.prefix)})
    return sorted({c for c, _ in _dir_members(src.path)})


def _decode(data: bytes, where: str) -> np.ndarray:
    """``(C,H,W)`` uint8 RGB array from encoded image bytes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot decode image '{where}': {e}") from None
    return arr.transpose(2, 0, 1)


def _read_and_decode(src: _Source, desc: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image of ``src``: ``(images uint8 (N,3,H,W), targets int64 (N,), classes)``, where
    ``classes`` are the sorted class folders of this tree and ``targets`` index them."""
    from tqdm.auto import tqdm

    if src.is_zip:
        with _open_zip(src.path) as zf:
            members = _zip_members(zf, src.prefix)
            # Reading the bytes is sequential I/O; decoding (which releases the GIL in Pillow) is threaded.
            blobs = [zf.read(name) for _, name in members]
    else:
        members = _dir_members(src.path)
        blobs = [Path(name).read_bytes() for _, name in members]
    if not members:
        raise UserError(f"no images found in '{src}' (expected <class>/<file>.jpg entries)")
    classes = sorted({c for c, _ in members})
    index = {c: i for i, c in enumerate(classes)}
    targets = np.array([index[c] for c, _ in members], dtype=np.int64)
    first = _decode(blobs[0], members[0][1])
    images = np.empty((len(blobs),) + first.shape, dtype=np.uint8)

    def work(lo: int, hi: int) -> int:
        for i in range(lo, hi):
            arr = _decode(blobs[i], members[i][1])
            if arr.shape != first.shape:
                raise UserError(
                    f"images in '{src}' differ in size: '{members[0][1]}' is {first.shape[2]}x"
                    f"{first.shape[1]} but '{members[i][1]}' is {arr.shape[2]}x{arr.shape[1]}; "
                    "resize them to one size first"
                )
            images[i] = arr
        return hi - lo

    chunk = 512
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(blobs), desc=desc, unit="img",
                                                               disable=not progress_enabled()) as bar:
        futures = [pool.submit(work, lo, min(lo + chunk, len(blobs))) for lo in range(0, len(blobs), chunk)]
        try:
            for f in futures:
                bar.update(f.result())
        except BaseException:
            for f in futures:  # stop queued chunks: the first bad image already decides the outcome
                f.cancel()
            raise
    return images, targets, classes


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all pixels of uint8 ``(N,C,H,W)``, in [0,1] units."""
    c = images.shape[1]
    s = np.zeros(c, dtype=np.float64)
    ss = np.zeros(c, dtype=np.float64)
    for lo in range(0, len(images), 4096):  # chunks keep the float64 copy small
        chunk = images[lo:lo + 4096].astype(np.float64) / 255.0
        s += chunk.sum(axis=(0, 2, 3))
        ss += (chunk**2).sum(axis=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


# --------------------------------------------------------------------------------------------- caching


def _source_fingerprint(src: _Source) -> dict:
    if src.is_zip:
        st = src.path.stat()
        return {"path": str(src.path), "prefix": src.prefix, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    # A directory's own mtime misses changes in nested files, so hash the whole listing's stats.
    h = hashlib.sha256()
    for _, f in _dir_members(src.path):
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(src.path), "listing_sha256": h.hexdigest()}


def _cache_file(src: _Source, fingerprint: dict) -> Path:
    key = json.dumps({"v": CACHE_VERSION, "src": fingerprint}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    stem = "-".join(p for p in (src.path.parent.name, src.path.stem, src.prefix.strip("/")) if p)
    return cache_dir() / f"{stem}-{digest}.npz"


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` via a temp file and ``os.replace``: readers never see a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # uncompressed: loading is I/O bound, and JPEG'd pixels compress poorly
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by the group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cache(path: Path, meta_expected: dict, meta_only: bool = False
                ) -> tuple[np.ndarray | None, np.ndarray | None, dict] | None:
    """The cached ``(images, targets, meta)``, or None if missing, stale or corrupt (then it is rebuilt).

    With ``meta_only`` the arrays are not read (an ``.npz`` member is only loaded when accessed).
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if {k: meta.get(k) for k in meta_expected} != meta_expected:
                return None
            if meta_only:
                return None, None, meta
            images, targets = z["images"], z["targets"]
        ok = (images.dtype == np.uint8 and images.ndim == 4 and targets.dtype == np.int64
              and targets.shape == (images.shape[0],) and len(images) > 0
              and list(images.shape[1:]) == meta["shape"]
              and int(targets.min()) >= 0 and int(targets.max()) < len(meta["classes"]))
        if not ok:
            raise ValueError("inconsistent arrays")
        return images, targets, meta
    except Exception as e:  # any damage (truncated file, bad zip, bad json) means: decode again
        logger.warning("ignoring corrupt dataset cache %s (%s); decoding again", path, e)
        return None


def _cache_lookup(src: _Source, meta_only: bool) -> tuple[Path, dict, tuple | None]:
    fingerprint = _source_fingerprint(src)
    expected = {"version": CACHE_VERSION, "source": fingerprint}
    path = _cache_file(src, fingerprint)
    return path, expected, _load_cache(path, expected, meta_only)


def _load_source(src: _Source, desc: str, meta_only: bool = False
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """``(images uint8 (N,3,H,W), targets int64 (N,), meta)`` of one tree, decoded once and then cached.

    ``meta`` holds ``classes`` (this tree's sorted class folders, which ``targets`` index), ``mean`` and
    ``std`` (per channel, [0,1] units) and ``shape`` ``[C,H,W]``. With ``meta_only`` and a valid cache,
    images and targets are not read and come back as None.
    """
    path, expected, cached = _cache_lookup(src, meta_only)
    if cached is not None:
        images, targets, meta = cached
        if meta_only:
            return None, None, meta
    else:
        images, targets, classes = _read_and_decode(src, desc)
        mean, std = _channel_stats(images)
        meta = dict(expected, classes=classes, mean=list(mean), std=list(std), shape=list(images.shape[1:]))
        try:
            _atomic_save_npz(path, images=images, targets=targets, meta=np.array(json.dumps(meta)))
        except OSError as e:  # a read-only home must not stop a run; it only costs the decode next time
            logger.warning("could not write dataset cache %s (%s)", path, e)
    return torch.from_numpy(images), torch.from_numpy(targets), meta


def _source_classes(src: _Source) -> list[str]:
    """Sorted class folders of one tree; read from its cache when there is one, because parsing the
    directory of a 100k-entry zip takes seconds."""
    cached = _cache_lookup(src, meta_only=True)[2]
    return list(cached[2]["classes"]) if cached is not None else _listed_classes(src)


def _remap(targets: torch.Tensor, local: Sequence[str], classes: Sequence[str]) -> torch.Tensor:
    """Labels indexing ``local`` -> labels indexing ``classes`` (a superset, e.g. the union over splits)."""
    if list(local) == list(classes):
        return targets
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[c] for c in local], dtype=torch.int64)[targets]


# ------------------------------------------------------------------------------------------- built-ins

# Mean/std over all training pixels, in [0,1] units (per channel, pooled over images and positions).
# CIFAR-10: the standard values of the original training set; our JPEG copy gives mean (0.4913, 0.4821,
# 0.4465), std (0.2452, 0.2428, 0.2606) -- JPEG smooths a little -- but the standard values are kept so
# checkpoints match torchvision-cifar10 ones. tiny-imagenet-32 and eurosat-32: computed once with
# `_channel_stats(get_dataset(name, "train").images.numpy())` from /work/shared/datasets/<name>/train.zip.
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_TINY_MEAN, _TINY_STD = (0.4820, 0.4500, 0.3997), (0.2603, 0.2533, 0.2665)
_EUROSAT_MEAN, _EUROSAT_STD = (0.3459, 0.3821, 0.4096), (0.1971, 0.1347, 0.1151)


@dataclass(frozen=True)
class _Builtin:
    folder: str
    splits: dict  # split name -> zip file name
    info: DatasetInfo
    names_tsv: str | None = None  # optional "<folder name>\t<readable name>" file


_BUILTINS = {
    "cifar10": _Builtin("cifar10", {"train": "train.zip", "test": "test.zip"},
                        DatasetInfo("cifar10", 10, 32, 3, _CIFAR10_MEAN, _CIFAR10_STD)),
    "tiny-imagenet-32": _Builtin("tiny-imagenet-32",
                                 {"train": "train.zip", "val": "val.zip", "test": "val.zip"},
                                 DatasetInfo("tiny-imagenet-32", 200, 32, 3, _TINY_MEAN, _TINY_STD),
                                 names_tsv="classes.tsv"),
    "eurosat-32": _Builtin("eurosat-32", {"train": "train.zip", "val": "val.zip", "test": "test.zip"},
                           DatasetInfo("eurosat-32", 10, 32, 3, _EUROSAT_MEAN, _EUROSAT_STD)),
}
_TORCHVISION_INFO = {
    "torchvision-cifar10": DatasetInfo("torchvision-cifar10", 10, 32, 3, _CIFAR10_MEAN, _CIFAR10_STD),
    "torchvision-cifar100": DatasetInfo("torchvision-cifar100", 100, 32, 3, _CIFAR100_MEAN, _CIFAR100_STD),
}

# name -> factory(split, root, download) -> ImageDataset. `imagefolder:<path>` is parsed in get_dataset.
DATASETS: Registry[Callable[..., ImageDataset]] = Registry("dataset")


def _read_names(path: Path, classes: Sequence[str]) -> list[str] | None:
    if not path.is_file():
        return None
    table = {}
    for line in path.read_text().splitlines():
        key, _, name = line.partition("\t")
        if key and name:
            table[key.strip()] = name.strip()
    return [table.get(c, c) for c in classes]


def _builtin_split_path(name: str, split: str, root: str | None) -> Path:
    """The zip of a built-in split; UserError naming what is missing (no decoding)."""
    spec = _BUILTINS[name]
    if split not in spec.splits:
        raise UserError(f"dataset '{name}' has no split '{split}'; choose from: {', '.join(spec.splits)}")
    folder = resolve_data_root(root) / spec.folder
    path = folder / spec.splits[split]
    if not path.is_file():
        present = sorted(s for s, f in spec.splits.items() if (folder / f).is_file())
        have = f"splits present: {', '.join(present)}" if present else f"'{folder}' holds none of its zips"
        raise UserError(f"missing '{path}' for {name} split '{split}'; {have}")
    return path


def check_available(name: str, splits: tuple[str, ...] = (), root: str | None = None) -> None:
    """Fail fast, without decoding anything, if dataset ``name`` (and the given splits) cannot be read.

    Built-in names: the data root and each split's zip must exist. ``imagefolder:`` paths are opened by
    :func:`dataset_info`. torchvision names are downloaded or read by torchvision itself when loaded.
    """
    if name in _BUILTINS:
        for split in splits or tuple(_BUILTINS[name].splits)[:1]:
            _builtin_split_path(name, split, root)
        return
    dataset_info(name, root=root)


def _load_builtin(name: str, split: str, root: str | None) -> ImageDataset:
    spec = _BUILTINS[name]
    path = _builtin_split_path(name, split, root)
    folder = path.parent
    src = _Source(path.resolve())
    images, targets, meta = _load_source(src, desc=f"decoding {name}/{split}")
    classes = meta["classes"]
    if len(classes) != spec.info.num_classes:
        raise UserError(f"'{path}' has {len(classes)} class folders, expected {spec.info.num_classes} "
                        f"for {name}")
    if tuple(images.shape[1:]) != (spec.info.channels, spec.info.image_size, spec.info.image_size):
        raise UserError(f"'{path}' holds {tuple(images.shape[1:])} images, expected 3x32x32 for {name}")
    names = _read_names(folder / spec.names_tsv, classes) if spec.names_tsv else None
    return ImageDataset(images, targets, classes, spec.info, names)


for _name in _BUILTINS:
    DATASETS.register(_name, lambda split, root=None, download=False, _n=_name: _load_builtin(
        _n, split, root))


def _load_torchvision(name: str, split: str, root: str | None, download: bool) -> ImageDataset:
    if split not in ("train", "test"):
        raise UserError(f"dataset '{name}' has no split '{split}'; choose from: train, test")
    from torchvision import datasets as tvd  # imported late: it is slow and only these two names need it

    # Downloads go to the given root, else $SMOOTHTRANSFER_DATA, else the cache; never into the cwd.
    base = Path(root or os.environ.get(DATA_ENV) or cache_dir() / "torchvision").expanduser()
    cls = tvd.CIFAR10 if name == "torchvision-cifar10" else tvd.CIFAR100
    try:
        ds = cls(str(base), train=split == "train", download=download)
    except RuntimeError as e:
        hint = "" if download else "; pass --download to fetch it"
        raise UserError(f"{name} not found under '{base}' ({e}){hint}") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # (N,32,32,3) -> NCHW
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageDataset(images, targets, ds.classes, _TORCHVISION_INFO[name])


for _name in _TORCHVISION_INFO:
    DATASETS.register(_name, lambda split, root=None, download=False, _n=_name: _load_torchvision(
        _n, split, root, download))


# ----------------------------------------------------------------------------------------- imagefolder


def _split_entries(d: Path) -> dict[str, Path]:
    """Split-named children of directory ``d``: ``{"train": d/train or d/train.zip, ...}``."""
    out = {}
    for s in KNOWN_SPLITS:
        if (d / s).is_dir():
            out[s] = d / s
        elif (d / f"{s}.zip").is_file():
            out[s] = d / f"{s}.zip"
    return out


def _zip_split_prefixes(zf: zipfile.ZipFile, wrapper: str) -> dict[str, str]:
    """Split-named top folders inside a zip: ``{"train": "train/", ...}`` (after a wrapper folder)."""
    tops = {n[len(wrapper):].split("/", 1)[0] for n in zf.namelist() if n.startswith(wrapper) and
            n[len(wrapper):].count("/") >= 2 and _is_image(n)}
    return {s: f"{wrapper}{s}/" for s in KNOWN_SPLITS if s in tops}


def _as_source(p: Path) -> _Source:
    """One split's tree: a directory, or a zip (skipping a single wrapper folder)."""
    if p.is_dir():
        return _Source(p.resolve())
    with _open_zip(p) as zf:
        return _Source(p.resolve(), _zip_wrapper_prefix(zf))


def _imagefolder_layout(path_str: str, root: str | None) -> tuple[Path, _Source | None, dict[str, _Source]]:
    """``(path, source of the path itself or None, {split: source})`` for an ``imagefolder:`` path.

    A folder or zip with split-named children (``train/``, ``val.zip``, ...) is a container of splits;
    otherwise the path itself is one ImageFolder tree, used for every split name.
    """
    p = Path(path_str).expanduser()
    if not p.exists() and not p.is_absolute():
        # Also accept a path relative to the data root, e.g. imagefolder:eurosat-32.
        try:
            alt = resolve_data_root(root) / p
        except UserError:
            alt = p
        p = alt if alt.exists() else p
    if not p.exists():
        raise UserError(f"imagefolder path '{path_str}' does not exist")
    if p.is_dir():
        entries = {s: _as_source(e) for s, e in _split_entries(p).items()}
    else:
        with _open_zip(p) as zf:
            wrapper = _zip_wrapper_prefix(zf)
            # A single top folder named like a split ("train/") is that split, not a wrapper.
            wrapper = "" if wrapper.strip("/") in KNOWN_SPLITS else wrapper
            entries = {s: _Source(p.resolve(), pre) for s, pre in _zip_split_prefixes(zf, wrapper).items()}
    if entries:
        if "test" not in entries and "val" in entries:
            entries["test"] = entries["val"]  # like tiny-imagenet: val doubles as the test split
        return p, None, entries
    return p, _as_source(p), {}


def _imagefolder_pick(path_str: str, split: str, whole: _Source | None,
                      entries: dict[str, _Source]) -> _Source:
    if whole is not None:
        return whole
    if split not in entries:
        raise UserError(f"imagefolder '{path_str}' has no split '{split}'; splits present: "
                        f"{', '.join(sorted(entries))}")
    return entries[split]


def _imagefolder_classes(whole: _Source | None, entries: dict[str, _Source]) -> list[str]:
    """Sorted class folders; with split folders, the union over splits, so a label means the same class in
    every split even when one split lacks a class."""
    sources = [whole] if whole is not None else sorted(set(entries.values()), key=str)
    return sorted({c for s in sources for c in _source_classes(s)})


def _imagefolder_info(path_str: str, whole: _Source | None, entries: dict[str, _Source],
                      classes: list[str]) -> DatasetInfo:
    """Mean/std from the train split (else the first split present, else the data itself), so every split
    of one imagefolder reports the same normalisation. Cheap once that split is cached."""
    if whole is not None:
        stats_src = whole
    else:
        stats_src = entries.get("train") or entries[next(s for s in KNOWN_SPLITS if s in entries)]
    meta = _load_source(stats_src, desc=f"decoding {stats_src.path.name}", meta_only=True)[2]
    c, h, w = meta["shape"]
    if h != w:
        logger.warning("imagefolder '%s' has non-square %dx%d images; image_size is the height",
                       path_str, w, h)
    return DatasetInfo(f"imagefolder:{path_str}", len(classes), int(h), int(c), tuple(meta["mean"]),
                       tuple(meta["std"]))


def _load_imagefolder(path_str: str, split: str, root: str | None, min_classes: int = 2) -> ImageDataset:
    _, whole, entries = _imagefolder_layout(path_str, root)
    src = _imagefolder_pick(path_str, split, whole, entries)
    classes = _imagefolder_classes(whole, entries)
    images, targets, meta = _load_source(src, desc=f"decoding {src.path.name}")
    if len(classes) < min_classes:
        # One class "trains" to accuracy 1 and only fails later, when certify needs >= 2 classes.
        raise UserError(f"imagefolder '{path_str}' has {'one class' if len(classes) == 1 else 'no class'} "
                        f"({', '.join(repr(c) for c in classes)}); classification needs at least {min_classes}: put "
                        "each class's images in its own <class>/ folder")
    targets = _remap(targets, meta["classes"], classes)
    info = _imagefolder_info(path_str, whole, entries, classes)
    if images.shape[1] != info.channels or images.shape[2] != info.image_size:
        raise UserError(f"imagefolder '{path_str}': split '{split}' has {tuple(images.shape[1:])} images but "
                        f"the train split has {info.channels}-channel images of height {info.image_size}")
    return ImageDataset(images, targets, classes, info)


# ----------------------------------------------------------------------------------------------- API


def get_dataset(name: str, split: str, root: str | None = None, download: bool = False,
                min_classes: int = 2) -> ImageDataset:
    """Load one split of a dataset as an :class:`ImageDataset`.

    Names: ``cifar10`` (train/test), ``tiny-imagenet-32`` (train/val; ``test`` = val), ``eurosat-32``
    (train/val/test), ``imagefolder:<dir or .zip>`` (``<path>/<split>[.zip]`` if present, else the path
    itself), ``torchvision-cifar10`` / ``torchvision-cifar100`` (``download=True`` fetches them).
    An imagefolder with fewer than ``min_classes`` class folders (over all its splits) is refused; pass
    ``min_classes=1`` where labels do not matter (denoiser training).
    """
    if name.startswith("imagefolder:"):
        path = name.split(":", 1)[1]
        if not path:
            raise UserError("imagefolder needs a path: imagefolder:<dir or .zip>")
        return _load_imagefolder(path, split, root, min_classes)
    if name == "imagefolder":
        raise UserError("imagefolder needs a path: imagefolder:<dir or .zip>")
    try:
        factory = DATASETS.get(name)
    except UserError as e:
        raise UserError(f"{e}, imagefolder:<dir or .zip>") from None
    return factory(split, root=root, download=download)


def dataset_info(name: str, root: str | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; no disk access for built-in and torchvision names.

    For ``imagefolder:`` the statistics come from its train split (decoded once, then read from the cache).
    """
    if name in _BUILTINS:
        return _BUILTINS[name].info
    if name in _TORCHVISION_INFO:
        return _TORCHVISION_INFO[name]
    if name.startswith("imagefolder:") and name != "imagefolder:":
        path_str = name.split(":", 1)[1]
        _, whole, entries = _imagefolder_layout(path_str, root)
        return _imagefolder_info(path_str, whole, entries, _imagefolder_classes(whole, entries))
    get_dataset(name, "train", root)  # raises the unknown-name error
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["DATASETS", "DatasetInfo", "ImageDataset", "cache_dir", "check_available", "dataset_info",
           "get_dataset", "resolve_data_root"]
