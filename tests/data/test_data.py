"""Tests for smoothtransfer.data: datasets (real zips, built fixtures), caching, subsets, noise, augments."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smoothtransfer.data import (
    TRAIN_AUGMENTS,
    DatasetInfo,
    ImageDataset,
    MixedSigmaSampler,
    dataset_info,
    evenly_spaced,
    gaussian_noise,
    get_dataset,
    k_shot_indices,
    random_crop_flip,
    resolve_data_root,
    train_val_split,
)
from smoothtransfer.data import datasets as dsmod
from smoothtransfer.errors import UserError

EUROSAT_CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _shared_root() -> Path | None:
    try:
        root = resolve_data_root(None)
    except UserError:
        return None
    return root if (root / "eurosat-32" / "val.zip").is_file() else None


SHARED = _shared_root()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared datasets folder not found")


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache, so no test reads another's (or the user's) decoded arrays."""
    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def eurosat_val(tmp_path_factory):
    """eurosat-32 val decoded once for the module, with the cache dir it was written to."""
    cache = tmp_path_factory.mktemp("eurosat_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOOTHTRANSFER_CACHE", str(cache))
        ds = get_dataset("eurosat-32", "val", root=str(SHARED) if SHARED else None)
    return ds, cache


# ----------------------------------------------------------------------------------- fixture builders

COLORS = {"cat": (200, 10, 10), "ant": (10, 200, 10), "bee": (10, 10, 200), "dog": (100, 100, 100)}


def _png(color, size=(8, 8), mode="RGB") -> bytes:
    im = Image.new("RGB", size, color)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")  # lossless, so decoded pixels can be checked exactly
    return buf.getvalue()


def _tree(splits: dict[str, dict[str, int]], size=(8, 8)) -> dict[str, bytes]:
    """``{"<split>/<class>/<i>.png": bytes}``; each image is its class colour (green channel += i)."""
    files = {}
    for split, counts in splits.items():
        for cls, n in counts.items():
            for i in range(n):
                r, g, b = COLORS[cls]
                name = f"{split}/{cls}/{i:03d}.png" if split else f"{cls}/{i:03d}.png"
                files[name] = _png((r, g + i, b), size)
    return files


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in reversed(sorted(files)):  # reverse order: the loader must sort, not trust the zip order
            zf.writestr(name, files[name])
    return path


def _write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


# ------------------------------------------------------------------------------------------ real data


@needs_shared
def test_eurosat_val_real_zip(eurosat_val):
    ds, _ = eurosat_val
    assert len(ds) == 4320
    assert ds.classes == EUROSAT_CLASSES  # sorted folder names
    assert ds.images.shape == (4320, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.targets.shape == (4320,) and ds.targets.dtype == torch.int64
    counts = torch.bincount(ds.targets, minlength=10)
    assert counts.sum() == 4320 and (counts > 300).all()  # every class well represented
    assert bool((ds.targets[1:] >= ds.targets[:-1]).all())  # ImageFolder order: grouped by class
    assert int(ds.images.min()) < 30 and int(ds.images.max()) > 225  # real pixel range, not all-zero
    x, y = ds[100]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert isinstance(y, int) and y == int(ds.targets[100])
    assert torch.equal((x * 255).round().to(torch.uint8), ds.images[100])
    assert ds.info == dataset_info("eurosat-32")
    assert ds.info.num_classes == 10 and ds.info.image_size == 32 and ds.info.channels == 3
    # Hard-coded mean/std agree with the data (val is a different split, so only to ~0.01).
    mean = ds.images.double().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(ds.info.mean, dtype=torch.float64), atol=0.01)


@needs_shared
def test_cache_roundtrip_real(eurosat_val, monkeypatch):
    ds, cache = eurosat_val
    files = list(cache.glob("eurosat-32-val-*.npz"))
    assert len(files) == 1
    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(cache))

    def boom(*a, **k):
        raise AssertionError("decoded again although a valid cache exists")

    monkeypatch.setattr(dsmod, "_read_and_decode", boom)
    monkeypatch.setattr(dsmod, "_listed_classes", boom)  # a cache hit must not even parse the zip directory
    again = get_dataset("eurosat-32", "val", root=str(SHARED))
    assert torch.equal(again.images, ds.images) and torch.equal(again.targets, ds.targets)
    assert again.classes == ds.classes


@needs_shared
def test_class_order_cifar10_and_builtin_infos():
    src = dsmod._Source((SHARED / "cifar10" / "test.zip").resolve())
    assert dsmod._source_classes(src) == CIFAR10_CLASSES
    assert dataset_info("cifar10").mean == (0.4914, 0.4822, 0.4465)
    tiny = dataset_info("tiny-imagenet-32")
    assert tiny.num_classes == 200 and tiny.image_size == 32
    assert dataset_info("torchvision-cifar100").num_classes == 100


@needs_shared
@pytest.mark.slow
def test_tiny_imagenet_val_names_and_test_alias():
    ds = get_dataset("tiny-imagenet-32", "test", root=str(SHARED))  # test = val
    assert len(ds) == 10000 and len(ds.classes) == 200
    assert torch.equal(torch.bincount(ds.targets), torch.full((200,), 50))
    assert ds.classes == sorted(ds.classes) and ds.classes[0] == "n01443537"
    assert ds.class_names[0].startswith("goldfish")


@needs_shared
@pytest.mark.slow
def test_tiny_imagenet_train_full():
    ds = get_dataset("tiny-imagenet-32", "train", root=str(SHARED))
    assert ds.images.shape == (100000, 3, 32, 32)
    assert torch.equal(torch.bincount(ds.targets), torch.full((200,), 500))


# ---------------------------------------------------------------------------------- errors, data root


def test_resolve_data_root_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("SMOOTHTRANSFER_DATA", str(b))
    assert resolve_data_root(str(a)) == a.resolve()  # explicit beats env
    assert resolve_data_root(None) == b.resolve()
    with pytest.raises(UserError, match="not a directory"):
        resolve_data_root(str(tmp_path / "missing"))
    monkeypatch.setenv("SMOOTHTRANSFER_DATA", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="SMOOTHTRANSFER_DATA"):
        resolve_data_root(None)
    # ../shared/datasets beside the cwd
    monkeypatch.delenv("SMOOTHTRANSFER_DATA")
    (tmp_path / "shared" / "datasets").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_data_root(None) == (tmp_path / "shared" / "datasets").resolve()


def test_missing_data_root_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SMOOTHTRANSFER_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dsmod, "_repo_data_root", lambda: None)
    with pytest.raises(UserError, match="no data root found.*--data-root.*SMOOTHTRANSFER_DATA.*torchvision"):
        resolve_data_root(None)
    with pytest.raises(UserError, match="no data root found"):
        get_dataset("eurosat-32", "val")


def test_unknown_dataset_and_split_errors(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'cifar11'.*cifar10"):
        get_dataset("cifar11", "train", root=str(tmp_path))
    with pytest.raises(UserError, match="needs a path"):
        get_dataset("imagefolder", "train")
    with pytest.raises(UserError, match="no split 'val'.*train, test"):
        get_dataset("cifar10", "val", root=str(tmp_path))
    with pytest.raises(UserError, match="no split 'holdout'"):
        get_dataset("torchvision-cifar10", "holdout", root=str(tmp_path))
    with pytest.raises(UserError, match="unknown dataset"):
        dataset_info("nope")


def test_builtin_missing_zip_lists_present_splits(tmp_path):
    (tmp_path / "eurosat-32").mkdir()
    _write_zip(tmp_path / "eurosat-32" / "val.zip", _tree({"": {"cat": 1}}))
    with pytest.raises(UserError, match="missing .*train.zip.*splits present: val"):
        get_dataset("eurosat-32", "train", root=str(tmp_path))
    # The zip exists but has 1 class instead of 10: refuse rather than mislabel.
    with pytest.raises(UserError, match="1 class folders, expected 10"):
        get_dataset("eurosat-32", "val", root=str(tmp_path))


def test_torchvision_without_download_is_user_error(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(UserError, match="not found.*--download"):
        get_dataset("torchvision-cifar10", "test", root=str(tmp_path), download=False)


# ---------------------------------------------------------------------------------------- imagefolder


SPLITS = {"train": {"cat": 3, "ant": 2, "bee": 4}, "test": {"bee": 2, "ant": 1, "dog": 1}}


def test_imagefolder_zip_with_splits(tmp_path):
    z = _write_zip(tmp_path / "data.zip", _tree(SPLITS))
    train = get_dataset(f"imagefolder:{z}", "train")
    test = get_dataset(f"imagefolder:{z}", "test")
    # union of class folders over splits, sorted, so labels agree between splits
    assert train.classes == test.classes == ["ant", "bee", "cat", "dog"]
    assert train.targets.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert test.targets.tolist() == [0, 1, 1, 3]
    assert train.images.shape == (9, 3, 8, 8) and train.images.dtype == torch.uint8
    # exact pixels (PNG): first "ant" image is (10, 200, 10), third "bee" image has green 10+2
    assert train.images[0, :, 0, 0].tolist() == [10, 200, 10]
    assert train.images[4, :, 3, 5].tolist() == [10, 12, 200]
    assert train.info.num_classes == 4 and train.info.image_size == 8
    assert train.info.name == f"imagefolder:{z}"
    # mean/std come from the train split for both splits
    assert train.info == test.info
    mean = train.images.double().div(255).mean(dim=(0, 2, 3))
    assert np.allclose(train.info.mean, mean.numpy(), atol=1e-4)
    assert dataset_info(f"imagefolder:{z}") == train.info
    with pytest.raises(UserError, match="no split 'val'; splits present: test, train"):
        get_dataset(f"imagefolder:{z}", "val")


def test_imagefolder_dir_matches_zip_and_val_alias(tmp_path):
    files = _tree({"train": SPLITS["train"], "val": SPLITS["test"]})
    d = _write_dir(tmp_path / "tree", files)
    z = _write_zip(tmp_path / "tree.zip", files)
    a = get_dataset(f"imagefolder:{d}", "train")
    b = get_dataset(f"imagefolder:{z}", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and a.classes == b.classes
    # no test split: test = val, as for tiny-imagenet
    t = get_dataset(f"imagefolder:{d}", "test")
    assert torch.equal(t.images, get_dataset(f"imagefolder:{d}", "val").images)


def test_imagefolder_split_zips_in_dir_and_plain_tree(tmp_path):
    d = tmp_path / "splitzips"
    d.mkdir()
    _write_zip(d / "train.zip", _tree({"": SPLITS["train"]}))
    ds = get_dataset(f"imagefolder:{d}", "train")
    assert len(ds) == 9 and ds.classes == ["ant", "bee", "cat"]
    with pytest.raises(UserError, match="splits present: train"):
        get_dataset(f"imagefolder:{d}", "test")
    # a plain tree (no split folders) is used as-is; a zipped folder's wrapper directory is skipped
    wrapped = {f"wrap/{k}": v for k, v in _tree({"": {"dog": 2, "cat": 1}}).items()}
    plain = _write_zip(tmp_path / "plain.zip", wrapped)
    p = get_dataset(f"imagefolder:{plain}", "test")
    assert p.classes == ["cat", "dog"] and p.targets.tolist() == [0, 1, 1]


def test_imagefolder_converts_modes_and_rejects_mixed_sizes(tmp_path):
    files = {"a/0.png": _png((50, 50, 50), mode="L"), "b/0.png": _png((1, 2, 3), mode="RGBA")}
    ds = get_dataset(f"imagefolder:{_write_zip(tmp_path / 'modes.zip', files)}", "train")
    assert ds.images.shape == (2, 3, 8, 8)
    assert ds.images[0, :, 0, 0].tolist() == [50, 50, 50] and ds.images[1, :, 0, 0].tolist() == [1, 2, 3]
    files["b/1.png"] = _png((1, 2, 3), size=(9, 8))
    with pytest.raises(UserError, match="differ in size"):
        get_dataset(f"imagefolder:{_write_zip(tmp_path / 'sizes.zip', files)}", "train")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        get_dataset(f"imagefolder:{tmp_path / 'nothing'}", "train")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("not an image")
    with pytest.raises(UserError, match="no images found"):
        get_dataset(f"imagefolder:{tmp_path / 'empty'}", "train")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read zip"):
        get_dataset(f"imagefolder:{bad}", "train")
    corrupt = _write_zip(tmp_path / "corrupt.zip", {"a/0.jpg": b"\xff\xd8garbage"})
    with pytest.raises(UserError, match="cannot decode image"):
        get_dataset(f"imagefolder:{corrupt}", "train")


# ------------------------------------------------------------------------------------------- caching


def test_cache_written_reused_rebuilt_and_keyed_by_mtime(tmp_path, monkeypatch):
    z = _write_zip(tmp_path / "c.zip", _tree({"": {"cat": 2, "dog": 3}}))
    cache = tmp_path / "cache"
    calls = []
    real = dsmod._read_and_decode
    monkeypatch.setattr(dsmod, "_read_and_decode", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = get_dataset(f"imagefolder:{z}", "train")
    files = list(cache.glob("*.npz"))
    assert len(calls) == 1 and len(files) == 1
    assert not list(cache.glob(".*.tmp"))  # atomic write left no temp file behind
    second = get_dataset(f"imagefolder:{z}", "train")
    assert len(calls) == 1 and torch.equal(first.images, second.images)

    files[0].write_bytes(b"PK\x03\x04 truncated garbage")  # corrupt cache: ignored and rebuilt
    third = get_dataset(f"imagefolder:{z}", "train")
    assert len(calls) == 2 and torch.equal(first.images, third.images)
    with np.load(files[0]) as f:  # and the rebuilt file is valid again
        assert f["images"].shape == (5, 3, 8, 8)

    st = z.stat()
    os.utime(z, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched source: new key, decode again
    get_dataset(f"imagefolder:{z}", "train")
    assert len(calls) == 3 and len(list(cache.glob("*.npz"))) == 2


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("x")
    monkeypatch.setenv("SMOOTHTRANSFER_CACHE", str(blocker / "sub"))
    ds = get_dataset(f"imagefolder:{_write_zip(tmp_path / 'u.zip', _tree({'': {'cat': 1, 'dog': 1}}))}", "train")
    assert len(ds) == 2


def test_one_class_imagefolder_is_refused_at_load(tmp_path):
    """One class folder would "train" to accuracy 1 and only fail at certify time: refuse when loading."""
    one = _write_zip(tmp_path / "one.zip", _tree({"": {"cat": 3}}))
    with pytest.raises(UserError, match=r"has one class \('cat'\).*at least 2"):
        get_dataset(f"imagefolder:{one}", "train")
    split = _write_dir(tmp_path / "split", _tree({"train": {"cat": 2}, "test": {"cat": 1}}))
    with pytest.raises(UserError, match="has one class"):
        get_dataset(f"imagefolder:{split}", "test")
    # class-free uses (a denoiser learns from images alone) may ask for fewer
    assert len(get_dataset(f"imagefolder:{one}", "train", min_classes=1)) == 3


# ------------------------------------------------------------------------------------- ImageDataset


def _toy_dataset(n_per_class=(5, 3, 4), seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    images = torch.randint(0, 256, (len(targets), 3, 4, 4), generator=g, dtype=torch.uint8)
    info = DatasetInfo("toy", len(n_per_class), 4, 3, (0.5,) * 3, (0.5,) * 3)
    return ImageDataset(images, targets, [f"c{i}" for i in range(len(n_per_class))], info)


def test_image_dataset_subset_and_batch():
    ds = _toy_dataset()
    sub = ds.subset([7, 0, 11])
    assert len(sub) == 3 and sub.targets.tolist() == [1, 0, 2] and torch.equal(sub.images[0], ds.images[7])
    assert sub.classes == ds.classes and sub.info == ds.info
    x, y = ds.get_batch(torch.tensor([1, 2]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4) and y.tolist() == [0, 0]
    assert torch.allclose(x[0], ds[1][0])
    with pytest.raises(UserError, match="out of range"):
        ds.subset([12])
    with pytest.raises(ValueError):
        ImageDataset(ds.images.float(), ds.targets, ds.classes, ds.info)


# --------------------------------------------------------------------------------------------- subsets


def test_k_shot_counts_determinism_and_errors():
    t = torch.tensor([0] * 10 + [1] * 7 + [2] * 12)
    t = t[torch.randperm(29, generator=torch.Generator().manual_seed(1))]
    idx = k_shot_indices(t, 5, seed=3)
    assert idx.dtype == torch.int64 and len(idx) == 15 and torch.equal(idx, idx.sort().values)
    assert torch.bincount(t[idx]).tolist() == [5, 5, 5]
    assert len(set(idx.tolist())) == 15
    assert torch.equal(idx, k_shot_indices(t.tolist(), 5, seed=3))  # list input, same seed: same draw
    assert any(not torch.equal(idx, k_shot_indices(t, 5, seed=s)) for s in range(4, 8))  # seed matters
    assert set(k_shot_indices(t, 2, seed=3).tolist()) <= set(idx.tolist())  # nested across k
    with pytest.raises(UserError, match="class 1 has only 7 examples, fewer than k=8"):
        k_shot_indices(t, 8, seed=0)
    with pytest.raises(UserError, match="k .* >= 1"):
        k_shot_indices(t, 0, seed=0)
    with pytest.raises(UserError, match="class 3 has no examples"):
        k_shot_indices(t, 1, seed=0, num_classes=4)


def test_train_val_split_disjoint_stratified_deterministic():
    t = torch.tensor([0] * 100 + [1] * 50 + [2] * 7 + [3] * 1)
    tr, va = train_val_split(t, 0.2, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(t)))
    # round(0.2 n) per class, at least 1, and a singleton class stays in train
    assert torch.bincount(t[va], minlength=4).tolist() == [20, 10, 1, 0]
    assert torch.equal(tr, tr.sort().values) and torch.equal(va, va.sort().values)
    tr2, va2 = train_val_split(t, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, train_val_split(t, 0.2, seed=1)[1])
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="val_fraction"):
            train_val_split(t, bad, seed=0)


def test_evenly_spaced():
    assert evenly_spaced(10, 3, -1) == [0, 3, 6, 9]
    assert evenly_spaced(10, 3, None) == [0, 3, 6, 9]
    assert evenly_spaced(10, 3, 2) == [0, 3]
    assert evenly_spaced(10000, 20, 500) == list(range(0, 10000, 20))  # Cohen's CIFAR-10 test subset
    assert evenly_spaced(5, 1, 0) == []
    with pytest.raises(UserError, match="skip"):
        evenly_spaced(10, 0, -1)
    with pytest.raises(UserError, match="max"):
        evenly_spaced(10, 1, -2)


# ----------------------------------------------------------------------------------------------- noise


def test_gaussian_noise_scalar_sigma():
    x = torch.zeros(64, 3, 32, 32, dtype=torch.float64)
    d = gaussian_noise(x, 0.5, generator=torch.Generator().manual_seed(0))
    assert d.shape == x.shape and d.dtype == torch.float32
    # 196,608 draws: sd of the sample std is 0.5/sqrt(2n) ~ 0.0008, so 0.005 is a > 6-sd tolerance
    assert abs(float(d.std()) - 0.5) < 0.005 and abs(float(d.mean())) < 0.005
    d2 = gaussian_noise(x, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d, d2)
    assert torch.equal(gaussian_noise(x, 0.0), torch.zeros_like(d))
    assert gaussian_noise(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), 0.25).dtype == torch.float32
    with pytest.raises(UserError, match="sigma"):
        gaussian_noise(x, -0.1)


def test_gaussian_noise_per_image_sigma():
    sig = torch.tensor([0.0, 0.12, 0.5, 1.0])
    d = gaussian_noise(torch.zeros(4, 3, 64, 64), sig, generator=torch.Generator().manual_seed(1))
    stds = d.flatten(1).std(dim=1)
    assert float(stds[0]) == 0.0
    # 12,288 draws per image: relative sd of the sample std ~ 0.0064; tolerance 5% is > 7 sd
    assert torch.allclose(stds[1:], sig[1:], rtol=0.05)
    z = torch.zeros(4, 3, 64, 64)
    assert torch.equal(gaussian_noise(z, torch.tensor(0.3), torch.Generator().manual_seed(1)),
                       gaussian_noise(z, 0.3, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="per-image sigma"):
        gaussian_noise(torch.zeros(4, 3, 2, 2), torch.ones(3))


def test_mixed_sigma_sampler_frequencies():
    s = MixedSigmaSampler([0.25, 0.5, 1.0], weights=[1, 2, 7])
    draws = s.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (100_000,) and draws.dtype == torch.float32
    assert set(draws.unique().tolist()) == {0.25, 0.5, 1.0}
    freq = [(draws == v).float().mean().item() for v in (0.25, 0.5, 1.0)]
    # sd of each frequency <= sqrt(.25/1e5) = 0.0016; tolerance 0.01 is > 6 sd
    assert np.allclose(freq, [0.1, 0.2, 0.7], atol=0.01)
    assert abs(s.mean_sigma - (0.025 + 0.1 + 0.7)) < 1e-12
    same = s.sample(50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(same, s.sample(50, generator=torch.Generator().manual_seed(5)))
    u = MixedSigmaSampler([0.1, 0.2]).sample(20_000, generator=torch.Generator().manual_seed(2))
    assert abs((u == 0.1).float().mean().item() - 0.5) < 0.02  # default uniform; sd 0.0035
    assert MixedSigmaSampler(0.5).sample(3).tolist() == [0.5] * 3


@pytest.mark.parametrize("sigmas,weights,msg", [
    ([], None, "at least one"),
    ([0.25, float("nan")], None, "finite"),
    ([0.25, -0.5], None, ">= 0"),
    ([0.25, float("inf")], None, "finite"),
    ([0.25, 0.5], [1.0], "2 sigmas"),
    ([0.25, 0.5], [1.0, -1.0], "weights"),
    ([0.25, 0.5], [0.0, 0.0], "not all zero"),
    ([0.25, 0.5], [1.0, float("nan")], "weights"),
])
def test_mixed_sigma_sampler_validation(sigmas, weights, msg):
    with pytest.raises(UserError, match=msg):
        MixedSigmaSampler(sigmas, weights)


# ---------------------------------------------------------------------------------------- transforms


def _all_crops(img: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Reference: every zero-padded crop and its mirror, by plain slicing. img: (C,H,W)."""
    _, h, w = img.shape
    p = torch.nn.functional.pad(img, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = p[:, dy:dy + h, dx:dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_random_crop_flip_matches_reference_and_is_seeded():
    x = torch.rand(40, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    y = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    for i in range(len(x)):  # each output is exactly one padded crop (maybe mirrored) of its own input
        assert any(torch.equal(y[i], c) for c in _all_crops(x[i], 2))
    assert torch.equal(y, random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(y, random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(2)))
    moved = (y != x).flatten(1).any(dim=1).float().mean()
    assert moved > 0.8  # only 1/50 of draws is the identity (centre crop, no flip)


def test_random_crop_flip_statistics_and_padding():
    x = torch.ones(2000, 1, 6, 6)
    y = random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(0))
    assert (y == 0).any() and set(y.unique().tolist()) == {0.0, 1.0}  # zero padding, no interpolation
    ramp = torch.arange(6.0).expand(2000, 1, 6, 6).contiguous()
    f = random_crop_flip(ramp, padding=0, generator=torch.Generator().manual_seed(0))
    flipped = (f[:, 0, 0, 0] == 5).float().mean().item()
    assert abs(flipped - 0.5) < 0.05  # 2000 fair coins: sd 0.011
    assert torch.equal(f[f[:, 0, 0, 0] == 0], ramp[: int((f[:, 0, 0, 0] == 0).sum())])


def test_train_augments_registry():
    assert TRAIN_AUGMENTS.names() == ["crop_flip", "none"]
    x = torch.rand(4, 3, 8, 8)
    assert TRAIN_AUGMENTS.get("none")(x) is x
    assert TRAIN_AUGMENTS.get("crop_flip")(x, generator=torch.Generator().manual_seed(0)).shape == x.shape
    with pytest.raises(UserError, match="unknown train augmentation"):
        TRAIN_AUGMENTS.get("mixup")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_crop_flip_and_noise_on_cuda():
    x = torch.rand(8, 3, 32, 32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    assert random_crop_flip(x, generator=g).device == x.device
    assert random_crop_flip(x, generator=torch.Generator().manual_seed(0)).device == x.device  # CPU generator
    assert gaussian_noise(x, 0.25, generator=g).device == x.device
    assert MixedSigmaSampler([0.25, 0.5]).sample(8, device="cuda").device.type == "cuda"
