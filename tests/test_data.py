"""advtrain.data: file readers, corrupt-file handling, the device-resident loader, synthetic data, image folders.

Real MNIST / Fashion-MNIST come from $ADVTRAIN_DATA (default ../shared/data) and are skipped when it is absent; every other
dataset is written here, small, in its official format.
"""

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from advtrain.data import Batch, DataError, EvalSet, TrainLoader, apply_augmentation, build_data
from advtrain.data.mnist import read_mnist
from advtrain.data.synthetic import robust_mask
from conftest import SHARED_DATA

CPU = torch.device("cpu")


def make_cfg(**keys):
    """A dataset config holding exactly the keys the config layer provides (struct mode: reading others fails)."""
    cfg = dict(
        name="synthetic", root=None, download=False, check_md5=False, train_subset=None, val_size=0,
        crop_padding=0, flip=False, mean=[0.5], std=[0.25], num_classes=None, shape=None, n_train=None,
        n_test=None, noise=None, image_size=None, workers=None,
    )
    cfg.update(keys)
    cfg = OmegaConf.create(cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg


def synthetic_cfg(**keys):
    keys = {**dict(num_classes=10, shape=[1, 12, 12], n_train=300, n_test=100, noise=0.04), **keys}
    channels = keys["shape"][0]
    return make_cfg(**{"mean": [0.5] * channels, "std": [0.25] * channels, **keys})


def identity_images(n: int, shape) -> np.ndarray:
    """uint8 images whose first two pixels spell their row number, so a row can be traced through the loader."""
    images = np.random.default_rng(n).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0], flat[:, 1] = np.arange(n) % 256, np.arange(n) // 256
    return images


def row_numbers(images: torch.Tensor) -> list[int]:
    flat = images.reshape(len(images), -1).long()
    return (flat[:, 0] + 256 * flat[:, 1]).tolist()


# --- MNIST-style IDX files -------------------------------------------------------------------------------------

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 100, n_test: int = 20) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte", identity_images(n, (28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return raw


@pytest.mark.parametrize(
    "name, folder, first_labels",
    [("mnist", "MNIST", [5, 0, 4, 1, 9]), ("fashion_mnist", "FashionMNIST", [9, 0, 0, 3, 0])],
)
def test_real_mnist_raw_and_gz(name, folder, first_labels, tmp_path):
    if not (SHARED_DATA / folder / "raw").is_dir():
        pytest.skip(f"no {folder} under {SHARED_DATA}")
    train_x, train_y, test_x, test_y = read_mnist(name, SHARED_DATA, download=False, check=True)
    assert (len(train_x), len(test_x)) == (60000, 10000) and (len(train_y), len(test_y)) == (60000, 10000)
    assert train_x.dtype == np.uint8 and train_x.shape[1:] == (1, 28, 28)
    assert train_y[:5].tolist() == first_labels

    gz_only = tmp_path / folder / "raw"
    gz_only.mkdir(parents=True)
    for stem in STEMS:
        shutil.copy(SHARED_DATA / folder / "raw" / f"{stem}.gz", gz_only)
    for a, b in zip(read_mnist(name, tmp_path, download=False, check=True), (train_x, train_y, test_x, test_y)):
        np.testing.assert_array_equal(a, b)


def test_real_mnist_through_build_data():
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST under {SHARED_DATA}")
    data = build_data(make_cfg(name="mnist", root=str(SHARED_DATA), check_md5=True, val_size=5000), device=CPU,
                      seed=0, batch_size=256)
    assert (data.info.n_train, data.info.n_val, data.info.n_test) == (55000, 5000, 10000)
    assert data.info.shape == (1, 28, 28) and data.info.num_classes == 10
    assert data.train.images.dtype == torch.uint8  # kept compact; float only per batch


def test_truncated_idx(tmp_path):
    raw = write_mnist(tmp_path)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        build_data(make_cfg(name="mnist", root=str(tmp_path)), device=CPU, seed=0, batch_size=8)


def test_truncated_gz(tmp_path):
    raw = write_mnist(tmp_path)
    path = raw / "t10k-labels-idx1-ubyte"
    Path(f"{path}.gz").write_bytes(gzip.compress(path.read_bytes())[:-10])
    path.unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        build_data(make_cfg(name="mnist", root=str(tmp_path)), device=CPU, seed=0, batch_size=8)


def test_bad_idx_header(tmp_path):
    raw = write_mnist(tmp_path)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*header"):
        build_data(make_cfg(name="mnist", root=str(tmp_path)), device=CPU, seed=0, batch_size=8)


def test_md5_mismatch(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(DataError, match="train-images-idx3-ubyte: md5"):
        build_data(make_cfg(name="mnist", root=str(tmp_path), check_md5=True), device=CPU, seed=0, batch_size=8)


def test_missing_files_are_listed(tmp_path):
    with pytest.raises(DataError) as info:
        build_data(make_cfg(name="mnist", root=str(tmp_path)), device=CPU, seed=0, batch_size=8)
    message = str(info.value)
    assert all(stem in message for stem in STEMS)
    assert str(tmp_path / "MNIST" / "raw") in message and "dataset.download=true" in message and "\n" not in message
    with pytest.raises(DataError, match="data_batch_1.*data_batch_5.*test_batch.*cifar-10-batches-py"):
        build_data(make_cfg(name="cifar10", root=str(tmp_path / "nowhere"), mean=[0.5] * 3, std=[0.25] * 3),
                   device=CPU, seed=0, batch_size=8)


# --- CIFAR pickles and SVHN .mat -------------------------------------------------------------------------------


def cifar_row(image: np.ndarray) -> np.ndarray:
    """One (3,32,32) image as the official files store it: red plane, green plane, blue plane, each row-major."""
    red, green, blue = image
    return np.concatenate([red.ravel(), green.ravel(), blue.ravel()])


def write_cifar_batch(path: Path, images: np.ndarray, labels, label_key: bytes) -> None:
    batch = {b"batch_label": b"test", label_key: list(labels), b"data": np.stack([cifar_row(i) for i in images]),
             b"filenames": [b"x.png"] * len(images)}
    path.write_bytes(pickle.dumps(batch, protocol=4))


def known_image() -> np.ndarray:
    """A (3,32,32) image whose channels and axes can all be told apart."""
    rows, cols = np.mgrid[0:32, 0:32]
    return np.stack([rows * 8, cols * 8, np.full((32, 32), 77)]).astype(np.uint8)


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = identity_images(5 * 4 + 3, (3, 32, 32))
    images[0] = known_image()
    for b in range(5):
        rows = range(4 * b, 4 * b + 4)
        write_cifar_batch(folder / f"data_batch_{b + 1}", images[rows], [i % 10 for i in rows], b"labels")
    write_cifar_batch(folder / "test_batch", images[20:], [9, 8, 7], b"labels")
    return folder


def cifar_cfg(root: Path, name: str = "cifar10", **keys):
    return make_cfg(name=name, root=str(root), mean=[0.5] * 3, std=[0.25] * 3, **keys)


def test_cifar10(tmp_path):
    write_cifar10(tmp_path)
    data = build_data(cifar_cfg(tmp_path), device=CPU, seed=0, batch_size=8)
    assert (data.info.n_train, data.info.n_test, data.info.num_classes) == (20, 3, 10)
    assert data.info.shape == (3, 32, 32)
    x, y = data.train.fixed_batch(20)
    assert y.tolist() == [i % 10 for i in range(20)] and row_numbers(data.train.images[1:]) == list(range(1, 20))
    assert torch.equal(data.train.images[0], torch.from_numpy(known_image()))  # channels and axes in place
    assert x.dtype == torch.float32 and torch.equal(x[0], torch.from_numpy(known_image()).float() / 255)
    assert torch.cat([y for _, y in data.test.batches(2)]).tolist() == [9, 8, 7]


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = identity_images(6, (3, 32, 32))
    images[0] = known_image()
    write_cifar_batch(folder / "train", images[:4], [0, 99, 50, 7], b"fine_labels")
    write_cifar_batch(folder / "test", images[4:], [3, 98], b"fine_labels")
    data = build_data(cifar_cfg(tmp_path, "cifar100"), device=CPU, seed=0, batch_size=8)
    assert data.info.num_classes == 100 and (data.info.n_train, data.info.n_test) == (4, 2)
    assert data.train.fixed_batch(4)[1].tolist() == [0, 99, 50, 7]
    assert torch.equal(data.train.images[0], torch.from_numpy(known_image()))


def test_malicious_pickle_does_not_run(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DataError, match="data_batch_3.*cannot unpickle.*system"):
        build_data(cifar_cfg(tmp_path), device=CPU, seed=0, batch_size=8)
    assert not marker.exists()


def test_cifar_md5_and_shape_checks(tmp_path):
    folder = write_cifar10(tmp_path)
    with pytest.raises(DataError, match="data_batch_1: md5"):
        build_data(cifar_cfg(tmp_path, check_md5=True), device=CPU, seed=0, batch_size=8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"test_batch: 'data' is not an \(N,3072\) uint8 array"):
        build_data(cifar_cfg(tmp_path), device=CPU, seed=0, batch_size=8)


def write_svhn(path: Path, images: np.ndarray, labels) -> None:
    from scipy.io import savemat

    # The official layout: X is (H,W,C,N), y is (N,1) with the digit 0 stored as 10.
    savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": np.asarray(labels, np.uint8).reshape(-1, 1)})


def test_svhn(tmp_path):
    pytest.importorskip("scipy")
    images = identity_images(5, (3, 32, 32))
    images[0] = known_image()
    write_svhn(tmp_path / "train_32x32.mat", images[:3], [10, 1, 9])
    write_svhn(tmp_path / "test_32x32.mat", images[3:], [5, 10])
    data = build_data(cifar_cfg(tmp_path, "svhn"), device=CPU, seed=0, batch_size=8)
    assert (data.info.n_train, data.info.n_test, data.info.shape) == (3, 2, (3, 32, 32))
    assert data.train.fixed_batch(3)[1].tolist() == [0, 1, 9]
    assert [y.tolist() for _, y in data.test.batches(8)] == [[5, 0]]
    assert torch.equal(data.train.images[0], torch.from_numpy(known_image()))
    assert row_numbers(data.train.images[1:]) == [1, 2]


def test_svhn_without_scipy(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "scipy.io", None)  # import scipy.io now raises ImportError
    with pytest.raises(DataError, match=r"pip install advtrain\[svhn\]"):
        build_data(cifar_cfg(tmp_path, "svhn"), device=CPU, seed=0, batch_size=8)


# --- the device-resident loader --------------------------------------------------------------------------------


@pytest.fixture
def mnist_root(tmp_path):
    write_mnist(tmp_path, n_train=100, n_test=20)
    return tmp_path


def test_epoch_visits_every_example_once(mnist_root):
    data = build_data(make_cfg(name="mnist", root=str(mnist_root)), device=CPU, seed=0, batch_size=32)
    assert isinstance(data.train, TrainLoader) and isinstance(data.test, EvalSet) and data.val is None
    batches = list(data.train.epoch(0))
    assert len(batches) == len(data.train) == 4 and [len(b.y) for b in batches] == [32, 32, 32, 4]
    index = torch.cat([b.index for b in batches])
    assert sorted(index.tolist()) == list(range(100))
    assert all(isinstance(b, Batch) and b.crop is None and b.flip is None for b in batches)
    # without augmentation the batch is the stored image, in [0,1], with its label
    assert row_numbers(torch.cat([(b.x * 255).round() for b in batches])) == index.tolist()
    assert torch.equal(torch.cat([b.y for b in batches]), index % 10)
    assert batches[0].x.dtype == torch.float32 and batches[0].index.dtype == torch.int64


def test_subset_and_validation_split(mnist_root):
    data = build_data(make_cfg(name="mnist", root=str(mnist_root), train_subset=60, val_size=15), device=CPU, seed=3,
                      batch_size=16)
    assert (data.info.n_train, data.info.n_val, data.info.n_test) == (45, 15, 20)
    assert (data.train.n_examples, data.val.n_examples, data.test.n_examples) == (45, 15, 20)
    train_rows = row_numbers(data.train.images)
    val_rows = row_numbers(torch.cat([(x * 255).round() for x, _ in data.val.batches(4)]))
    assert not set(train_rows) & set(val_rows) and sorted(train_rows + val_rows) == list(range(60))
    assert val_rows == sorted(val_rows)  # fixed order
    other_seed = build_data(make_cfg(name="mnist", root=str(mnist_root), train_subset=60, val_size=15), device=CPU,
                            seed=4, batch_size=16)
    assert row_numbers(other_seed.train.images) != train_rows
    assert [len(x) for x, _ in data.val.batches(4, n=10)] == [4, 4, 2]
    with pytest.raises(DataError, match="val_size"):
        build_data(make_cfg(name="mnist", root=str(mnist_root), train_subset=10, val_size=10), device=CPU, seed=0,
                   batch_size=8)


def test_crop_and_flip_match_apply_augmentation():
    data = build_data(synthetic_cfg(crop_padding=4, flip=True), device=CPU, seed=0, batch_size=64)
    seen_flip = seen_crop = False
    for batch in data.train.epoch(0):
        assert batch.x.min() >= 0 and batch.x.max() <= 1
        assert batch.crop.dtype == torch.int64 and batch.crop.shape == (len(batch.y), 2)
        assert batch.crop.min() >= 0 and batch.crop.max() <= 8 and batch.flip.dtype == torch.bool
        original = data.train.images[batch.index].float() / 255
        assert torch.equal(batch.x, apply_augmentation(original, batch.crop, batch.flip, 4))
        seen_flip |= bool(batch.flip.any() & ~batch.flip.all())
        seen_crop |= bool((batch.crop != 4).any())
    assert seen_flip and seen_crop


def test_apply_augmentation_geometry():
    image = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4).repeat(3, 1, 1, 1)
    crop = torch.tensor([[2, 2], [0, 0], [2, 3]])  # centre, top-left corner, one pixel to the right
    out = apply_augmentation(image, crop, torch.tensor([False, False, True]), padding=2)
    assert torch.equal(out[0], image[0])
    assert torch.equal(out[1, 0, 2:, 2:], image[1, 0, :2, :2]) and out[1, 0, :2].abs().sum() == 0
    shifted = torch.cat([image[2, 0, :, 1:], torch.zeros(4, 1)], dim=1)
    assert torch.equal(out[2, 0], shifted.flip(-1))
    # a perturbation that needs gradients goes through unchanged in kind
    delta = torch.zeros(3, 1, 4, 4, requires_grad=True)
    apply_augmentation(delta, crop, None, padding=2).sum().backward()
    assert delta.grad is not None


def test_no_augmentation_leaves_images_alone():
    data = build_data(synthetic_cfg(), device=CPU, seed=0, batch_size=50)
    for batch in data.train.epoch(0):
        assert batch.crop is None and batch.flip is None
        assert torch.equal(batch.x, data.train.images[batch.index].float() / 255)


def test_resume_mid_epoch_reproduces_batches(tmp_path):
    cfg = synthetic_cfg(crop_padding=2, flip=True)

    def loader():
        return build_data(cfg, device=CPU, seed=5, batch_size=32).train

    uninterrupted = loader()
    list(uninterrupted.epoch(0))
    expected = list(uninterrupted.epoch(1)) + list(uninterrupted.epoch(2))

    interrupted = loader()
    list(interrupted.epoch(0))
    k = 3
    first = [b for _, b in zip(range(k), interrupted.epoch(1))]
    torch.save(interrupted.state_dict(), tmp_path / "loader.pt")

    resumed = loader()
    resumed.load_state_dict(torch.load(tmp_path / "loader.pt", weights_only=True))
    rest = list(resumed.epoch(1, start_batch=k)) + list(resumed.epoch(2))
    assert len(first) + len(rest) == len(expected)
    for got, want in zip(first + rest, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    with pytest.raises(ValueError, match="batch"):
        resumed.epoch(2, start_batch=1)


def test_seed_decides_batches():
    def first_batch(seed):
        return next(iter(build_data(synthetic_cfg(crop_padding=2, flip=True), device=CPU, seed=seed,
                                    batch_size=32).train.epoch(0)))

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert all(torch.equal(u, v) for u, v in zip(a[:5], b[:5])) and a.weight == b.weight == 1.0
    assert not torch.equal(a.index, c.index)


def test_loader_state_must_fit_the_data(tmp_path):
    small = build_data(synthetic_cfg(val_size=10), device=CPU, seed=0, batch_size=32).train
    full = build_data(synthetic_cfg(), device=CPU, seed=0, batch_size=32).train
    with pytest.raises(DataError, match="290.*300"):
        full.load_state_dict(small.state_dict())


def test_eval_batches_and_fixed_batch():
    data = build_data(synthetic_cfg(), device=CPU, seed=0, batch_size=32)
    xs, ys = zip(*data.test.batches(30))
    assert [len(y) for y in ys] == [30, 30, 30, 10]
    assert torch.equal(torch.cat(xs), data.test.images.float() / 255)
    assert sum(len(y) for _, y in data.test.batches(30, n=45)) == 45
    x, y = data.train.fixed_batch(7)
    assert x.shape == (7, 1, 12, 12) and torch.equal(x, data.train.images[:7].float() / 255)


def test_mean_std_must_match_channels():
    with pytest.raises(DataError, match="dataset.mean has 3 values"):
        build_data(synthetic_cfg(mean=[0.5] * 3), device=CPU, seed=0, batch_size=8)


# --- synthetic data --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 12, 12)])
def test_synthetic_shapes_and_determinism(shape):
    cfg = synthetic_cfg(shape=list(shape), num_classes=5, n_train=200, n_test=50)
    a, b = (build_data(cfg, device=CPU, seed=7, batch_size=16) for _ in range(2))
    c = build_data(cfg, device=CPU, seed=8, batch_size=16)
    assert a.info.shape == shape and a.info.num_classes == 5 and (a.info.n_train, a.info.n_test) == (200, 50)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape == (200, *shape)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert set(a.train.labels.tolist()) == set(range(5))


def nearest_mean_accuracy(train_x, train_y, test_x, test_y, num_classes):
    means = torch.stack([train_x[train_y == k].mean(0) for k in range(num_classes)])
    return (torch.cdist(test_x, means).argmin(1) == test_y).float().mean().item(), means


def test_synthetic_has_a_robust_and_a_non_robust_explanation():
    shape = (3, 8, 8)
    data = build_data(synthetic_cfg(shape=list(shape), n_train=2000, n_test=500), device=CPU, seed=0, batch_size=64)
    mask = torch.from_numpy(robust_mask(shape)).bool().expand(shape)
    train_x, test_x = data.train.images.float() / 255, data.test.images.float() / 255

    def part(x, pixels):
        return x[:, pixels]

    # The squares alone: strong (far beyond eps = 0.1 apart) and right for about 90% of the labels.
    accuracy, means = nearest_mean_accuracy(part(train_x, mask), data.train.labels, part(test_x, mask),
                                            data.test.labels, 10)
    assert 0.8 < accuracy < 0.97
    assert (means - 0.5).abs().mean() > 0.2
    # The faint texture everywhere else: within eps/2 of grey on average, yet it gives away (almost) every label.
    accuracy, means = nearest_mean_accuracy(part(train_x, ~mask), data.train.labels, part(test_x, ~mask),
                                            data.test.labels, 10)
    assert accuracy > 0.98
    assert (means - 0.5).abs().max() < 0.06


# --- image folders ---------------------------------------------------------------------------------------------


def write_folders(root: Path, per_class: dict[str, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(10 + i, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


def folder_cfg(root: Path, **keys):
    keys = {**dict(mean=[0.5] * 3, std=[0.25] * 3, image_size=8, workers=0, flip=True), **keys}
    return make_cfg(name="imagefolder", root=str(root), **keys)


def test_imagefolder_epoch(tmp_path):
    write_folders(tmp_path, {"train": 5, "val": 2})
    data = build_data(folder_cfg(tmp_path, val_size=2), device=CPU, seed=0, batch_size=3)
    assert data.info.shape == (3, 8, 8) and data.info.num_classes == 2
    assert (data.info.n_train, data.info.n_val, data.info.n_test) == (8, 2, 4)
    batches = list(data.train.epoch(0))
    assert len(batches) == len(data.train) == 3
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(8))
    for b in batches:
        assert b.x.dtype == torch.float32 and b.x.shape[1:] == (3, 8, 8) and 0 <= b.x.min() and b.x.max() <= 1
        assert b.crop is None and b.flip is None
    assert [len(y) for _, y in data.test.batches(3)] == [3, 1]
    assert sum(len(y) for _, y in data.val.batches(8)) == 2
    x, y = data.train.fixed_batch(2)
    assert x.shape == (2, 3, 8, 8) and y.dtype == torch.int64

    # a resumed epoch visits the remaining images in the uninterrupted order
    state = data.train.state_dict()
    resumed = build_data(folder_cfg(tmp_path, val_size=2), device=CPU, seed=99, batch_size=3).train
    resumed.load_state_dict(state)
    assert [b.index.tolist() for b in resumed.epoch(0, start_batch=1)] == [b.index.tolist() for b in batches[1:]]


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_errors(tmp_path, workers):
    with pytest.raises(DataError, match="<root>/train/<class>"):
        build_data(folder_cfg(tmp_path), device=CPU, seed=0, batch_size=2)
    write_folders(tmp_path, {"train": 2, "val": 1})
    (tmp_path / "train" / "dog" / "0.png").write_bytes(b"not a png")
    data = build_data(folder_cfg(tmp_path, workers=workers), device=CPU, seed=0, batch_size=4)
    # from a worker process too, the message is our one line, not the worker's traceback
    with pytest.raises(DataError, match=r"^\S+dog/0\.png: cannot read the image \(cannot identify image file"):
        list(data.train.epoch(0))
