"""Write the data subset ``benchmarks/gpu_check.sh`` needs, small enough to travel with the work tree.

The device machine sees only the repository (plus at most 64 MiB of carried, git-ignored paths), not the
``../shared/datasets`` beside it. This copies, byte for byte (no re-encoding), into ``.gpu_data/``:

* ``tiny-imagenet-32/train.zip``: every image of the first 40 classes (what the quick demo pre-trains on,
  so that pre-training sees exactly the images it sees from the full zip) and one image of each other class
  (the loader checks for all 200 class folders); ``classes.tsv``.
* ``cifar10/train.zip``: ``--cifar-train`` images spread evenly over the 50,000 (default 15,400: the demo
  fine-tunes on 15,000 after holding out 2% for validation; which 15,000 differs from the full-zip run).
* ``cifar10/test.zip``: the whole test split (the demo certifies every 100th image; the GPU check 20).

About 50 MiB in all. Usage, from the repository root::

    python benchmarks/gpu_data_subset.py [--src ../shared/datasets] [--out .gpu_data]

then on the device machine ``bash benchmarks/gpu_check.sh`` with ``.gpu_data`` carried.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zipfile
from pathlib import Path

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _members(zf: zipfile.ZipFile) -> list[tuple[str, str]]:
    """``[(class, member)]`` for ``[wrapper/]<class>/<file>`` images, sorted by member name."""
    names = [n for n in zf.namelist() if n.lower().endswith(IMAGE_EXT) and "__MACOSX/" not in n]
    tops = {n.split("/", 1)[0] for n in names}
    strip = len(tops) == 1 and all(n.count("/") >= 2 for n in names)  # a zipped folder: one wrapper level
    out = []
    for n in sorted(names):
        parts = n.split("/")[1:] if strip else n.split("/")
        if len(parts) >= 2:
            out.append((parts[0], n))
    return out


def _copy(src: Path, dst: Path, keep) -> int:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".zip.tmp")
    count = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        members = _members(zin)
        for _cls, name in keep(members):
            zout.writestr(zin.getinfo(name), zin.read(name))
            count += 1
    tmp.replace(dst)
    return count


def tiny_subset(members: list[tuple[str, str]], first: int = 40) -> list[tuple[str, str]]:
    classes = sorted({c for c, _ in members})
    keep = set(classes[:first])
    seen: set[str] = set()
    out = []
    for cls, name in members:
        if cls in keep or cls not in seen:
            out.append((cls, name))
            seen.add(cls)
    return out


def even_subset(members: list[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    if count >= len(members):
        return members
    step = len(members) / count
    return [members[int(i * step)] for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = Path(__file__).resolve().parents[1]
    p.add_argument("--src", default=str(here.parent / "shared" / "datasets"), help="the full datasets folder")
    p.add_argument("--out", default=str(here / ".gpu_data"), help="where to write the subset (git-ignored)")
    p.add_argument("--cifar-train", type=int, default=15_400, help="CIFAR-10 training images to keep")
    args = p.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    need = [src / "cifar10" / "train.zip", src / "cifar10" / "test.zip", src / "tiny-imagenet-32" / "train.zip"]
    missing = [str(f) for f in need if not f.is_file()]
    if missing:
        print(f"error: missing {', '.join(missing)}; pass --src DIR", file=sys.stderr)
        return 2
    n = _copy(src / "tiny-imagenet-32" / "train.zip", out / "tiny-imagenet-32" / "train.zip", tiny_subset)
    if (src / "tiny-imagenet-32" / "classes.tsv").is_file():
        shutil.copyfile(src / "tiny-imagenet-32" / "classes.tsv", out / "tiny-imagenet-32" / "classes.tsv")
    print(f"tiny-imagenet-32/train.zip: {n} images")
    n = _copy(src / "cifar10" / "train.zip", out / "cifar10" / "train.zip",
              lambda m: even_subset(m, args.cifar_train))
    print(f"cifar10/train.zip: {n} images")
    n = _copy(src / "cifar10" / "test.zip", out / "cifar10" / "test.zip", lambda m: m)
    print(f"cifar10/test.zip: {n} images")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB (the device machine takes at most 64 MiB with the work tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
