"""Tests of spvr_lib.data: real Fashion-MNIST files, and tiny fixtures in the real on-disk formats."""
from __future__ import annotations

import gzip
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spvr_lib import data
from spvr_lib.data import fashionmnist as fm

torch.set_num_threads(1)
SYSTEM = fm.SYSTEM_FASHION_MNIST
REAL_DOWNLOAD = fm._torchvision_download_fashion_mnist
needs_fashion_mnist = pytest.mark.skipif(not fm._has_fashion_mnist(SYSTEM),
                                         reason=f"Fashion-MNIST not installed in {SYSTEM}")


# --------------------------------------------------------------------------- fixture writers
def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    magic = {1: 2049, 3: 2051}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def tiny_fashion_mnist(folder: Path, per_class: dict[str, int] | None = None, gz: bool = True) -> Path:
    """Valid idx files with per_class[split] images per class; image k of the split is filled with k."""
    per_class = per_class or {"train": 3, "test": 2}
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images_stem, labels_stem) in fm.FASHION_MNIST_FILES.items():
        labels = np.repeat(np.arange(10), per_class[split]).astype(np.uint8)
        images = np.broadcast_to(np.arange(len(labels), dtype=np.uint8)[:, None, None], (len(labels), 28, 28))
        suffix = ".gz" if gz else ""
        write_idx(folder / (images_stem + suffix), np.ascontiguousarray(images), gz)
        write_idx(folder / (labels_stem + suffix), labels, gz)
    return folder


def write_jpeg(path: Path, color: tuple[int, int, int], size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, "JPEG", quality=95)


# --------------------------------------------------------------------------- idx parsing and locating
def test_read_idx_round_trip_gz_and_plain(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        path = write_idx(tmp_path / f"x{int(gz)}.gz" if gz else tmp_path / "x0", images, gz)
        np.testing.assert_array_equal(data.read_idx(path), images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "l.gz", labels)), labels)


def test_read_idx_rejects_corrupt_files(tmp_path):
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    good = gzip.compress((2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (5, 28, 28))
                         + images.tobytes())
    truncated_gz = tmp_path / "truncated.gz"
    truncated_gz.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.gz"):
        data.read_idx(truncated_gz)
    short = tmp_path / "short"
    short.write_bytes(gzip.decompress(good)[:-10])
    with pytest.raises(ValueError, match=r"short has 3926 bytes; expected 3936"):
        data.read_idx(short)
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes((1234).to_bytes(4, "big") + bytes(20))
    with pytest.raises(ValueError, match="magic number 1234; expected 2049"):
        data.read_idx(bad_magic)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match="plain.gz cannot be read"):
        data.read_idx(not_gzip)


def test_read_fashion_mnist_checks_label_count(tmp_path):
    folder = tiny_fashion_mnist(tmp_path / "fm")
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz holds shape \(7,\); expected labels \[20\]"):
        data.read_fashion_mnist(folder, "test")


def test_fashion_mnist_from_explicit_root_pads_and_normalises(tmp_path):
    folder = tiny_fashion_mnist(tmp_path / "fm", gz=False)
    train = data.load_dataset("fashion-mnist", "train", root=folder)
    assert len(train) == 30 and train.num_classes == 10
    assert train.targets.tolist() == np.repeat(np.arange(10), 3).tolist()
    x, y = train[7]
    assert x.shape == (1, 32, 32) and y == 2
    background = (0 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    inside = (7 / 255 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    expected = torch.full((1, 32, 32), background)
    expected[:, 2:30, 2:30] = inside
    torch.testing.assert_close(x, expected)


def test_ensure_fashion_mnist_missing_root_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.ensure_fashion_mnist(tmp_path / "nowhere")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(fm.data_dir() / "fashion-mnist") in message and "t10k-labels-idx1-ubyte.gz" in message


@pytest.fixture
def nothing_installed(tmp_path, monkeypatch):
    system = tmp_path / "usr-share" / "fashion-mnist"
    monkeypatch.setattr(fm, "SYSTEM_FASHION_MNIST", system)
    monkeypatch.setenv("SPVR_DATA", str(tmp_path / "repo-data"))
    return system


def test_ensure_fashion_mnist_installs_with_apt_when_root(nothing_installed, monkeypatch):
    calls = []

    def fake_run(cmd, check):
        calls.append(list(cmd))
        if cmd[:2] == ["apt-get", "install"]:
            tiny_fashion_mnist(nothing_installed)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fm, "_can_use_apt", lambda: True)
    monkeypatch.setattr(fm.subprocess, "run", fake_run)
    monkeypatch.setattr(fm, "_torchvision_download_fashion_mnist", lambda dest: pytest.fail("no download"))
    assert data.ensure_fashion_mnist() == nothing_installed
    assert calls == [["apt-get", "update"], ["apt-get", "install", "-y", "dataset-fashion-mnist"]]


def test_ensure_fashion_mnist_falls_back_to_download_then_error(nothing_installed, monkeypatch):
    monkeypatch.setattr(fm, "_can_use_apt", lambda: False)
    downloads = []

    def fake_download(dest):
        downloads.append(dest)
        tiny_fashion_mnist(dest)
        return True

    monkeypatch.setattr(fm, "_torchvision_download_fashion_mnist", fake_download)
    local = fm.data_dir() / "fashion-mnist"
    assert data.ensure_fashion_mnist() == local and downloads == [local]
    for f in local.iterdir():  # now nothing anywhere and no network
        f.unlink()
    monkeypatch.setattr(fm, "_network_reachable", lambda host, port, timeout_s=3.0: False)
    monkeypatch.setattr(fm, "_torchvision_download_fashion_mnist", REAL_DOWNLOAD)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.ensure_fashion_mnist()


def test_cli_prints_location(tmp_path, capsys):
    folder = tiny_fashion_mnist(tmp_path / "fm")
    assert data.main(["ensure", "fashion-mnist", "--root", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"fashion-mnist: {folder}"
    assert data.main(["ensure", "fashion-mnist", "--root", str(tmp_path / "none")]) == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real Fashion-MNIST
@needs_fashion_mnist
def test_fashion_mnist_constants_match_train_set():
    images, labels = data.read_fashion_mnist(str(SYSTEM), "train")
    assert images.shape == (60000, 28, 28) and np.bincount(labels).tolist() == [6000] * 10
    share = np.bincount(images.reshape(-1), minlength=256) / images.size  # histogram: fast exact moments
    levels = np.arange(256) / 255
    mean, mean_sq = share @ levels, share @ levels ** 2
    assert abs(mean - fm.FASHION_MNIST_MEAN_28) < 5e-5
    assert abs(np.sqrt(mean_sq - mean ** 2) - fm.FASHION_MNIST_STD_28) < 5e-5
    padded_mean = mean * 784 / 1024  # the 2-pixel zero border adds 1024 - 784 black pixels per image
    padded_std = np.sqrt(mean_sq * 784 / 1024 - padded_mean ** 2)
    assert abs(padded_mean - data.FASHION_MNIST_MEAN) < 5e-5 and abs(padded_std - data.FASHION_MNIST_STD) < 5e-5


@needs_fashion_mnist
def test_fashion_mnist_item_equals_reference_decoding():
    test = data.load_dataset("fashion-mnist", "test")
    assert len(test) == 10000 and test.targets.bincount().tolist() == [1000] * 10
    raw_images = gzip.decompress((SYSTEM / "t10k-images-idx3-ubyte.gz").read_bytes())
    raw_labels = gzip.decompress((SYSTEM / "t10k-labels-idx1-ubyte.gz").read_bytes())
    for i in (0, 1234, 9999):
        image = torch.tensor(list(raw_images[16 + 784 * i: 16 + 784 * (i + 1)]), dtype=torch.float32).view(1, 28, 28)
        expected = (F.pad(image / 255, (2, 2, 2, 2)) - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
        x, y = test[i]
        torch.testing.assert_close(x, expected)
        assert y == raw_labels[8 + i]


@needs_fashion_mnist
def test_augmentation_is_a_crop_of_the_padded_image_and_seeded():
    clean = data.load_dataset("fashion-mnist", "test")
    a = data.load_dataset("fashion-mnist", "test", augment=True, seed=3)
    b = data.load_dataset("fashion-mnist", "test", augment=True, seed=3)
    c = data.load_dataset("fashion-mnist", "test", augment=True, seed=4)
    draws_a = [a[i][0] for i in range(20)]
    assert all(torch.equal(x, b[i][0]) for i, x in enumerate(draws_a))
    assert not all(torch.equal(x, c[i][0]) for i, x in enumerate(draws_a))
    background = (0 - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD
    seen = set()
    for i, x in enumerate(draws_a):
        padded = F.pad(clean[i][0], (4, 4, 4, 4), value=background)  # black padding, normalised
        matches = {(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(x, (padded[:, dy:dy + 32, dx:dx + 32].flip(-1) if flip
                                      else padded[:, dy:dy + 32, dx:dx + 32]))}
        assert matches, f"augmented item {i} is not a crop/flip of the clean one"
        seen |= matches
    assert len({m[2] for m in seen}) == 2 and len({m[:2] for m in seen}) > 5
    a.reseed(3)
    assert torch.equal(a[0][0], draws_a[0])


@needs_fashion_mnist
def test_per_class_subset_is_stratified_and_deterministic():
    sub = data.load_dataset("fashion-mnist", "test", per_class=7, seed=1, augment=True)
    again = data.load_dataset("fashion-mnist", "test", per_class=7, seed=1)
    other = data.load_dataset("fashion-mnist", "test", per_class=7, seed=2)
    full = data.load_dataset("fashion-mnist", "test")
    assert len(sub) == 70 and sub.targets.bincount().tolist() == [7] * 10 and sub.num_classes == 10
    assert sub.indices == again.indices != other.indices
    assert sub.targets.tolist() == full.targets[sub.indices].tolist()
    sub.augment = False
    torch.testing.assert_close(sub[5][0], full[sub.indices[5]][0])


@needs_fashion_mnist
def test_calibration_set_disables_augmentation():
    dataset = data.load_dataset("fashion-mnist", "test", augment=True, seed=0)
    x, y = data.calibration_set(dataset, per_class=3, seed=5, progress=False)
    assert x.shape == (30, 1, 32, 32) and y.bincount().tolist() == [3] * 10
    assert dataset.augment is True
    indices = data.stratified_indices(dataset.targets, 3, 5)
    dataset.augment = False
    torch.testing.assert_close(x, torch.stack([dataset[i][0] for i in indices]))
    assert y.tolist() == dataset.targets[indices].tolist()


@needs_fashion_mnist
def test_fashion_mnist_scenes_masks_match_pixels_and_are_seeded():
    scenes = data.FashionMNISTScenes("test", n_images=40, canvas=48, items=(2, 3), seed=7)
    again = data.load_dataset("fashion-mnist-scenes", "test", n_images=40, canvas=48, items=(2, 3), seed=7)
    other = data.FashionMNISTScenes("test", n_images=40, canvas=48, items=(2, 3), seed=8)
    assert torch.equal(scenes.images, again.images) and torch.equal(scenes.masks, again.masks)
    assert not torch.equal(scenes.masks, other.masks)
    assert scenes.images.shape == (40, 1, 48, 48) and scenes.num_classes == 11
    foreground = scenes.images[:, 0].float() / 255 > fm.SCENE_THRESHOLD
    assert torch.equal(scenes.masks > 0, foreground)
    for mask in scenes.masks:  # at least one, at most 3 items (classes may repeat or be hidden)
        labels = set(mask.unique().tolist()) - {0}
        assert 1 <= len(labels) <= 3 and labels <= set(range(1, 11))
    x, m = scenes[3]
    assert x.shape == (1, 48, 48) and m.dtype == torch.long
    torch.testing.assert_close(x, (scenes.images[3].float() / 255 - 0.2860) / 0.3530)
    xc, yc = data.calibration_set(scenes, per_class=2, seed=0, progress=False)
    assert xc.shape == (22, 1, 48, 48) and yc.shape == (22, 48, 48)


def test_scenes_reject_bad_arguments(tmp_path):
    folder = tiny_fashion_mnist(tmp_path / "fm")
    with pytest.raises(ValueError, match="canvas=20"):
        data.FashionMNISTScenes("test", 4, canvas=20, root=folder)
    with pytest.raises(ValueError, match=r"items=\(3, 2\)"):
        data.FashionMNISTScenes("test", 4, items=(3, 2), root=folder)
    with pytest.raises(ValueError, match="per_class=2 applies to classification"):
        data.load_dataset("fashion-mnist-scenes", "test", root=folder, per_class=2, n_images=4)


# --------------------------------------------------------------------------- CIFAR-10
def write_cifar(root: Path, per_batch: int = 2, test: int = 3, skip: str | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        if name == skip:
            continue
        n = test if name == "test_batch" else per_batch
        images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        images[:, 0] = 10 * k       # red plane
        images[:, 2] = 200          # blue plane
        batch = {b"data": images.reshape(n, 3072), b"labels": [(k + j) % 10 for j in range(n)],
                 b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in data.CIFAR10_CLASSES]}))
    return root


def test_cifar10_reads_pickle_batches(tmp_path):
    root = write_cifar(tmp_path)
    train = data.load_dataset("cifar10", "train", root=root)
    test = data.load_dataset("cifar10", "test", root=root)
    assert len(train) == 10 and len(test) == 3 and train.num_classes == 10
    assert train.targets.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5] and test.targets.tolist() == [5, 6, 7]
    x, y = train[4]  # from data_batch_3 (k=2): red 20, green 0, blue 200
    assert x.shape == (3, 32, 32) and y == 2
    expected = [(v / 255 - m) / s for v, m, s in zip((20, 0, 200), data.CIFAR10_MEAN, data.CIFAR10_STD)]
    torch.testing.assert_close(x[:, 5, 7], torch.tensor(expected))
    augmented = data.load_dataset("cifar10", "train", root=root, augment=True)
    assert augmented[0][0].shape == (3, 32, 32)


def test_cifar10_missing_and_corrupt_batches(tmp_path):
    root = write_cifar(tmp_path / "a", skip="test_batch")
    with pytest.raises(FileNotFoundError, match="test_batch does not exist"):
        data.load_dataset("cifar10", "test", root=root)
    root = write_cifar(tmp_path / "b")
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="data_batch_2 is not a valid python-pickle batch"):
        data.load_dataset("cifar10", "train", root=root)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.load_dataset("cifar10", "train", root=tmp_path)


# --------------------------------------------------------------------------- Tiny ImageNet
WNIDS = ("n02", "n01")  # deliberately unsorted: labels follow the sorted order n01 -> 0, n02 -> 1
COLORS = {"n01": (250, 0, 0), "n02": (0, 0, 250)}


def write_tiny_imagenet(root: Path, with_annotations: bool = True) -> Path:
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "words.txt").write_text("n01\tred things\nn02\tblue things\n")
    for wnid in WNIDS:
        for j in range(3 if wnid == "n01" else 2):
            write_jpeg(base / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", COLORS[wnid])
    for name, wnid in (("val_0.JPEG", "n02"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02")):
        write_jpeg(base / "val" / "images" / name, COLORS[wnid])
    if with_annotations:
        (base / "val" / "val_annotations.txt").write_text(
            "val_0.JPEG\tn02\t0\t0\t10\t10\nval_1.JPEG\tn01\t1\t2\t30\t40\nval_2.JPEG\tn02\t5\t5\t60\t60\n")
    return root


def test_tiny_imagenet_labels_and_shapes(tmp_path):
    root = write_tiny_imagenet(tmp_path)
    train = data.load_dataset("tiny-imagenet", "train", root=root)
    val = data.load_dataset("tiny-imagenet", "test", root=root)
    assert train.classes == ["n01", "n02"] and train.targets.bincount().tolist() == [3, 2]
    assert val.targets.tolist() == [1, 0, 1]
    x, y = val[0]
    assert x.shape == (3, 64, 64) and y == 1
    blue = (250 / 255 - data.TINY_IMAGENET_MEAN[2]) / data.TINY_IMAGENET_STD[2]
    assert abs(x[2].mean().item() - blue) < 0.1 and x[2].mean() > x[0].mean()  # a blue image
    aug = data.load_dataset("tiny-imagenet", "train", root=root, augment=True, seed=1)
    assert aug[0][0].shape == (3, 64, 64)
    xc, yc = data.calibration_set(train, per_class=2, progress=False)
    assert xc.shape == (4, 3, 64, 64) and yc.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="class 1 has 2 samples; per_class=3"):
        data.calibration_set(train, per_class=3, progress=False)


def test_tiny_imagenet_errors(tmp_path):
    root = write_tiny_imagenet(tmp_path / "a", with_annotations=False)
    with pytest.raises(FileNotFoundError, match=r"val_annotations.txt does not exist"):
        data.load_dataset("tiny-imagenet", "test", root=root)
    base = root / "tiny-imagenet-200"
    (base / "train" / "n01" / "images" / "n01_0.JPEG").write_bytes(b"not a jpeg")
    train = data.load_dataset("tiny-imagenet", "train", root=root)
    with pytest.raises(ValueError, match="n01_0.JPEG cannot be decoded"):
        train[0]
    for f in (base / "train" / "n02" / "images").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"n02/images has no .JPEG images"):
        data.load_dataset("tiny-imagenet", "train", root=root)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.load_dataset("tiny-imagenet", "train", root=tmp_path / "missing")


# --------------------------------------------------------------------------- ImageNet
def test_imagenet_folders(tmp_path):
    for split, counts in (("train", {"n001": 3, "n002": 2}), ("val", {"n001": 1, "n002": 1})):
        for wnid, n in counts.items():
            for j in range(n):
                write_jpeg(tmp_path / split / wnid / f"{wnid}_{j}.JPEG", COLORS["n01" if wnid == "n001" else "n02"],
                           size=40)
    train = data.load_dataset("imagenet", "train", root=tmp_path, augment=True)
    val = data.load_dataset("imagenet", "test", root=tmp_path)
    assert train.classes == ["n001", "n002"] and np.bincount(train.targets).tolist() == [3, 2]
    assert val.targets == [0, 1] and val.num_classes == 2
    x, y = val[1]
    assert x.shape == (3, 224, 224) and y == 1 and x[2].mean() > x[0].mean()
    assert train[0][0].shape == (3, 224, 224)
    xc, yc = data.calibration_set(train, per_class=2, progress=False)
    assert xc.shape == (4, 3, 224, 224) and yc.tolist() == [0, 0, 1, 1] and train.augment is True
    with pytest.raises(FileNotFoundError, match=r"dataset .imagenet. is not at .*train.imagenet"):
        data.load_dataset("imagenet", "test", root=tmp_path / "train")


# --------------------------------------------------------------------------- Cityscapes
def write_cityscapes(root: Path, split: str = "val", skip_mask: bool = False) -> Path:
    label_ids = np.array([[7, 26, 0, 33], [24, 24, 6, 23]], dtype=np.uint8).repeat(2, 0).repeat(2, 1)  # 4x8
    for j in range(2):
        stem = f"frankfurt_000000_00000{j}"
        image = np.zeros((4, 8, 3), dtype=np.uint8)
        image[..., 0] = 100 + j + 10 * np.arange(8)  # a horizontal ramp, so flips show
        path = root / "leftImg8bit" / split / "frankfurt" / f"{stem}_leftImg8bit.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        if skip_mask and j == 1:
            continue
        mask_path = root / "gtFine" / split / "frankfurt" / f"{stem}_gtFine_labelIds.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_ids).save(mask_path)
    return root


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    root = write_cityscapes(tmp_path)
    val = data.load_dataset("cityscapes", "test", root=root)
    assert len(val) == 2 and val.num_classes == 19 and data.dataset_info("cityscapes").ignore_index == 255
    x, mask = val[1]
    assert x.shape == (3, 4, 8) and mask.dtype == torch.long
    expected = torch.tensor([[0, 13, 255, 18], [11, 11, 255, 10]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(mask, expected)
    torch.testing.assert_close(x[0, 0, 0], torch.tensor((101 / 255 - 0.485) / 0.229))
    small = data.load_dataset("cityscapes", "test", root=root, size=(2, 4))
    assert small[0][0].shape == (3, 2, 4)
    assert torch.equal(small[0][1], torch.tensor([[0, 13, 255, 18], [11, 11, 255, 10]]))
    flipped = data.load_dataset("cityscapes", "test", root=root, augment=True, seed=0)
    outcomes = set()
    for _ in range(8):  # image and mask are flipped together or not at all
        xa, ma = flipped[1]
        mask_flipped, image_flipped = torch.equal(ma, expected.flip(-1)), torch.equal(xa, x.flip(-1))
        assert mask_flipped == image_flipped and (image_flipped or torch.equal(xa, x))
        outcomes.add(image_flipped)
    assert outcomes == {False, True}


def test_cityscapes_errors(tmp_path):
    root = write_cityscapes(tmp_path, skip_mask=True)
    with pytest.raises(FileNotFoundError, match="frankfurt_000000_000001_gtFine_labelIds.png does not exist"):
        data.load_dataset("cityscapes", "test", root=root)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/train does not exist"):
        data.load_dataset("cityscapes", "train", root=root)
    with pytest.raises(ValueError, match=r"options \['resize'\] do not apply"):
        data.load_dataset("cityscapes", "test", root=root, resize=(2, 4))


# --------------------------------------------------------------------------- registry and helpers
def test_registry_and_bad_names():
    assert data.dataset_info("fashion-mnist") == data.DatasetInfo("fashion-mnist", 10, 1, 32, "classification")
    assert data.dataset_info("tiny-imagenet").num_classes == 200
    assert data.dataset_info("fashion-mnist-scenes").task == "segmentation"
    with pytest.raises(ValueError, match="'mnist' is unknown; expected one of .*cifar10"):
        data.load_dataset("mnist", "train")
    with pytest.raises(ValueError, match=r"split='val' is unknown; expected one of \('train', 'test'\)"):
        data.load_dataset("cifar10", "val")


def test_stratified_indices_exact():
    targets = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    chosen = data.stratified_indices(targets, 2, seed=0)
    assert chosen == sorted(chosen) and len(chosen) == 6
    assert [targets[i] for i in chosen] == [0, 0, 1, 1, 2, 2]
    assert chosen == data.stratified_indices(torch.tensor(targets), 2, seed=0)
    assert data.stratified_indices(targets, 2, seed=0, num_classes=3) == chosen
    assert len({tuple(data.stratified_indices(targets, 2, seed=s)) for s in range(10)}) > 1
    assert [i for i in data.stratified_indices(targets, 2, seed=3) if targets[i] == 1] == [3, 4]
    with pytest.raises(ValueError, match="class 1 has 2 samples; per_class=3"):
        data.stratified_indices(targets, 3, seed=0)
    with pytest.raises(ValueError, match="class 3 has 0 samples"):
        data.stratified_indices(targets, 1, seed=0, num_classes=4)


def test_make_guyon():
    x, y = data.make_guyon(n_samples=200, n_features=30, flip_y=0.02, seed=1)
    assert x.shape == (200, 30) and x.dtype == np.float32 and set(np.unique(y)) == {0, 1}
    x2, y2 = data.make_guyon(n_samples=200, n_features=30, flip_y=0.02, seed=1)
    np.testing.assert_array_equal(x, x2) and np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, data.make_guyon(n_samples=200, n_features=30, seed=2)[0])


def test_fingerprint_changes_with_the_files_and_check_reports_each_dataset(tmp_path, capsys):
    write_cifar(tmp_path)
    full = data.fingerprint("cifar10", root=tmp_path)
    assert full == data.fingerprint("cifar10", root=tmp_path)                 # names and sizes: stable
    (tmp_path / "cifar-10-batches-py" / "extra_batch").write_bytes(b"0")     # another copy of the dataset
    data._fingerprint.cache_clear()
    assert data.fingerprint("cifar10", root=tmp_path) != full
    problems = data.check_datasets(["cifar10", "tiny-imagenet"], root=tmp_path)
    out = capsys.readouterr().out
    assert "ok      cifar10:" in out and "train 10, test 3 images" in out
    assert set(problems) == {"tiny-imagenet"} and "missing tiny-imagenet" in out
    assert data.main(["check", "cifar10", "--root", str(tmp_path)]) == 0
    assert data.main(["check", "imagenet", "--root", str(tmp_path)]) == 1
