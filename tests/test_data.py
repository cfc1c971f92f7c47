"""Tests of prance.data on the real Fashion-MNIST files and on small real image folders."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from prance import data
from prance.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    InputSpec,
    TensorImageDataset,
    build_dataset,
    fashion_mnist,
    image_folder,
    input_spec_for_model,
    load_fashion_mnist,
    make_loader,
    read_idx,
    seeded_subset,
    train_val_split,
)
from prance.errors import PranceError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed in {DEBIAN_DIR} (apt-get install dataset-fashion-mnist)",
)
SPEC_1x28 = InputSpec(1, (28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
SPEC_3x32 = InputSpec(3, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """Encode ``array`` as an IDX file: magic (0, 0, type code, ndim), big-endian dims and data."""
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.fixture(scope="module")
def test_split() -> TensorImageDataset:
    return fashion_mnist("test", SPEC_1x28, root=DEBIAN_DIR)


# ------------------------------------------------------------------------------ IDX


def test_read_idx_roundtrips_each_element_type(tmp_path: Path) -> None:
    cases = {
        0x08: np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        0x09: np.array([-128, -1, 0, 127], dtype=np.int8),
        0x0B: np.array([[-300, 7], [2, 30000]], dtype=np.int16),
        0x0C: np.array([-(2**31), 5, 2**31 - 1], dtype=np.int32),
        0x0D: np.array([1.5, -2.25], dtype=np.float32),
        0x0E: np.array([[np.pi]], dtype=np.float64),
    }
    for code, array in cases.items():
        path = tmp_path / f"a{code}.idx"
        path.write_bytes(_idx_bytes(array, code))
        tensor = read_idx(path)
        assert tensor.dtype == torch.from_numpy(array).dtype
        np.testing.assert_array_equal(tensor.numpy(), array)


@needs_fmnist
def test_read_idx_gz_and_plain_agree(tmp_path: Path) -> None:
    gz = DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz"
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    assert torch.equal(read_idx(gz), read_idx(plain))


@needs_fmnist
def test_read_idx_rejects_truncated_and_corrupt_files(tmp_path: Path) -> None:
    raw = gzip.decompress((DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    bad = {
        "truncated_data": raw[:-10],
        "truncated_header": raw[:6],
        "trailing_bytes": raw + b"\x00",
        "bad_magic": b"\x01\x02" + raw[2:],
        "bad_type": raw[:2] + b"\x07" + raw[3:],
        "empty": b"",
    }
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(PranceError, match=name):  # the message names the file
            read_idx(path)
    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes((DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()[:500])
    with pytest.raises(PranceError, match="cut.gz"):
        read_idx(cut_gzip)
    with pytest.raises(PranceError, match="cannot read IDX file .*missing.idx"):
        read_idx(tmp_path / "missing.idx")


# -------------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_shapes_counts_and_class_balance(split: str, count: int) -> None:
    images, labels = load_fashion_mnist(split, root=DEBIAN_DIR, download=False)
    assert images.dtype == torch.uint8 and images.shape == (count, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (count,)
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    # Fashion-MNIST is exactly balanced: 6,000 images per class in train, 1,000 in test.
    assert labels.bincount(minlength=10).tolist() == [count // 10] * 10
    assert 0 < float(images.float().mean()) / 255 < 1 and int(images.max()) == 255
    assert len(FASHION_MNIST_CLASSES) == 10


@needs_fmnist
def test_fashion_mnist_mean_std_match_the_data() -> None:
    images, _ = load_fashion_mnist("train", root=DEBIAN_DIR)
    pixels = images.float().div(255)
    assert abs(float(pixels.mean()) - FASHION_MNIST_MEAN[0]) < 5e-4
    assert abs(float(pixels.std()) - FASHION_MNIST_STD[0]) < 5e-4


@needs_fmnist
def test_fashion_mnist_is_cached_and_val_is_test() -> None:
    first = load_fashion_mnist("test", root=DEBIAN_DIR)
    again = load_fashion_mnist("val", root=DEBIAN_DIR)
    assert first[0] is again[0] and first[1] is again[1]


@needs_fmnist
def test_fashion_mnist_finds_torchvision_layout_and_plain_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        src = DEBIAN_DIR / f"t10k-{kind}-ubyte.gz"
        (raw / f"t10k-{kind}-ubyte").write_bytes(gzip.decompress(src.read_bytes()))
    images, labels = load_fashion_mnist("test", root=tmp_path, download=False)
    reference = load_fashion_mnist("test", root=DEBIAN_DIR)
    assert torch.equal(images, reference[0]) and torch.equal(labels, reference[1])


def test_missing_fashion_mnist_without_download_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(PranceError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist("train", root=tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert "\n" not in message and "torchvision" in message and "PRANCE_FASHION_MNIST" in message


def test_failed_download_is_reported_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nName or service not known")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(PranceError, match="download failed: Error downloading") as info:
        load_fashion_mnist("train", root=tmp_path, download=True)
    assert "\n" not in str(info.value) and "dataset-fashion-mnist" in str(info.value)


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(PranceError, match="split"):
        load_fashion_mnist("holdout", download=False)


# -------------------------------------------------------------------- preprocessing


@needs_fmnist
def test_preprocessing_to_3x32(test_split: TensorImageDataset) -> None:
    ds = TensorImageDataset(test_split.images, test_split.labels, SPEC_3x32)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    xb, yb = ds.batch([0, 1, 2])
    assert xb.shape == (3, 3, 32, 32) and yb.dtype == torch.int64
    torch.testing.assert_close(xb[0], x)
    # Undoing the normalisation gives values in [0, 1].
    restored = xb * 0.25 + 0.5
    assert float(restored.min()) >= -1e-6 and float(restored.max()) <= 1 + 1e-6
    bicubic = InputSpec(3, (20, 20), (0.5,), (0.5,), interpolation="bicubic")
    small = TensorImageDataset(test_split.images, test_split.labels, bicubic).batch([0, 1])[0]
    assert small.shape == (2, 3, 20, 20) and float(small.abs().max()) <= 1 + 1e-6


@needs_fmnist
def test_default_spec_normalises_to_zero_mean_unit_std(test_split: TensorImageDataset) -> None:
    x, y = test_split.batch(range(2048))
    assert x.shape == (2048, 1, 28, 28)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    torch.testing.assert_close(test_split[5][0], x[5])
    assert test_split[5][1] == int(y[5]) and test_split.classes == FASHION_MNIST_CLASSES


def test_colour_images_to_grey_and_bad_channels() -> None:
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    grey = TensorImageDataset(images, torch.zeros(4), InputSpec(1, (8, 8), (0.0,), (1.0,)))
    torch.testing.assert_close(grey.batch([0])[0][0, 0], images[0].float().mean(0) / 255)
    two = TensorImageDataset(images, torch.zeros(4), InputSpec(2, (8, 8), (0.0,), (1.0,)))
    with pytest.raises(PranceError, match="channels"):
        two.batch([0])
    with pytest.raises(PranceError, match="mean has 2 values for 3 channels"):
        InputSpec(3, (8, 8), (0.1, 0.2), (1.0,))
    with pytest.raises(PranceError, match="images must be uint8"):
        TensorImageDataset(images.float(), torch.zeros(4), SPEC_1x28)


def test_input_spec_for_model_uses_the_built_shape() -> None:
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
        embed_dim=16, depth=1, num_heads=2, num_classes=10,
    )
    spec = input_spec_for_model(model)
    assert spec.in_chans == 1 and spec.img_size == (28, 28)
    assert spec.mean == (0.5,) and spec.std == (0.5,) and spec.interpolation == "bicubic"
    declared = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
        embed_dim=16, depth=1, num_heads=2, num_classes=10,
        pretrained_cfg_overlay=dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                                    interpolation="bilinear", crop_pct=1.0),
    )
    assert input_spec_for_model(declared) == SPEC_1x28


# ------------------------------------------------------------ subsets and loaders


def test_seeded_subset_is_deterministic() -> None:
    base = TensorDataset(torch.arange(1000))
    a, b, c = (seeded_subset(base, 50, seed) for seed in (3, 3, 4))
    assert isinstance(a, Subset) and len(a) == 50 and len(set(a.indices)) == 50
    assert a.indices == b.indices and a.indices != c.indices
    assert seeded_subset(base, None, 3).indices == list(range(1000))
    assert seeded_subset(base, 5000, 3).indices == list(range(1000))
    state = torch.get_rng_state()
    seeded_subset(base, 10, 9)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(PranceError, match="subset size must be at least 1"):
        seeded_subset(base, 0, 0)


def test_train_val_split_is_disjoint_and_covering() -> None:
    base = TensorDataset(torch.arange(1001))
    train, val = train_val_split(base, 0.1, seed=1)
    assert len(val) == 100 and len(train) == 901
    assert set(train.indices).isdisjoint(val.indices)
    assert set(train.indices) | set(val.indices) == set(range(1001))
    again = train_val_split(base, 0.1, seed=1)
    assert again[1].indices == val.indices and train_val_split(base, 0.1, 2)[1].indices != val.indices
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(PranceError, match=r"val_fraction must be in \(0, 1\)"):
            train_val_split(base, bad, 0)


@needs_fmnist
def test_make_loader_batches_order_and_speed(test_split: TensorImageDataset) -> None:
    start = time.perf_counter()
    batches = list(make_loader(test_split, 256))
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"iterating the test set took {elapsed:.2f}s"
    assert len(batches) == 40 and batches[0][0].shape == (256, 1, 28, 28)
    assert batches[-1][0].shape == (10000 - 39 * 256, 1, 28, 28)
    assert torch.equal(torch.cat([y for _, y in batches]), test_split.labels)

    subset = seeded_subset(test_split, 1000, seed=0)
    order = lambda seed: torch.cat([y for _, y in make_loader(subset, 64, shuffle=True, seed=seed)])  # noqa: E731
    assert torch.equal(order(5), order(5)) and not torch.equal(order(5), order(6))
    dropped = list(make_loader(subset, 64, shuffle=True, seed=5, drop_last=True))
    assert len(dropped) == 1000 // 64 and all(x.shape == (64, 1, 28, 28) for x, _ in dropped)

    # Fast path (nested Subset) serves the same items as per-item access.
    train, val = train_val_split(subset, 0.2, seed=0)
    x, y = next(iter(make_loader(val, 8)))
    for k in range(8):
        item_x, item_y = val[k]
        torch.testing.assert_close(x[k], item_x)
        assert int(y[k]) == item_y


def test_make_loader_generic_dataset_and_bad_batch_size() -> None:
    base = TensorDataset(torch.randn(10, 2), torch.arange(10))
    batches = list(make_loader(base, 4, shuffle=True, seed=1))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    again = list(make_loader(base, 4, shuffle=True, seed=1))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    with pytest.raises(PranceError, match="batch_size must be at least 1"):
        make_loader(base, 0)


# ------------------------------------------------------------------ image folders


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 real Fashion-MNIST images as PNG: 2 classes x 2 images in each of train/ and val/."""
    from PIL import Image

    if not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not installed in {DEBIAN_DIR}")
    images, labels = load_fashion_mnist("test", root=DEBIAN_DIR)
    root = tmp_path_factory.mktemp("folder")
    for label, name in ((7, "sneaker"), (8, "bag")):
        picks = (labels == label).nonzero().flatten()[:4].tolist()
        for k, index in enumerate(picks):
            split = "train" if k < 2 else "val"
            target = root / split / name
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index].numpy(), mode="L").save(target / f"{index}.png")
    return root


def test_image_folder_classes_and_shapes(png_folder: Path) -> None:
    train = image_folder(png_folder, "train", SPEC_1x28)
    assert train.classes == ["bag", "sneaker"] and len(train) == 4
    x, y = train[0]
    assert x.shape == (1, 28, 28) and y == 0
    # The eval transform at native size reproduces the IDX pixels exactly.
    source = load_fashion_mnist("test", root=DEBIAN_DIR)[0][int(Path(train.samples[0][0]).stem)]
    torch.testing.assert_close(x, data.preprocess(source[None], SPEC_1x28)[0])

    val = image_folder(png_folder, "test", SPEC_3x32)  # no test/: falls back to val/
    x, _ = val[3]
    assert len(val) == 4 and x.shape == (3, 32, 32)
    torch.testing.assert_close(x[0], x[1])
    augmented = image_folder(png_folder, "train", SPEC_3x32, train=True)
    batch = next(iter(make_loader(augmented, 4, shuffle=True, seed=0)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].shape == (4,)

    via_name = build_dataset(f"imagefolder:{png_folder}", "val", SPEC_1x28)
    assert via_name.classes == train.classes and len(via_name) == 4


def test_image_folder_errors(tmp_path: Path, png_folder: Path) -> None:
    with pytest.raises(PranceError, match="does not exist"):
        image_folder(tmp_path / "absent", "train", SPEC_1x28)
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    with pytest.raises(PranceError, match="val/ or test/"):
        image_folder(tmp_path / "only_train", "val", SPEC_1x28)
    (tmp_path / "only_train" / "train" / "empty_class").mkdir()
    with pytest.raises(PranceError, match="no class subfolders with images"):
        image_folder(tmp_path / "only_train", "train", SPEC_1x28)
    with pytest.raises(PranceError, match="split"):
        image_folder(png_folder, "dev", SPEC_1x28)


# ------------------------------------------------------------------ build_dataset


@needs_fmnist
def test_build_dataset_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (DEBIAN_DIR,))
    ds = build_dataset("fashion-mnist", "val", SPEC_1x28)
    assert isinstance(ds, TensorImageDataset) and len(ds) == 10000


def test_build_dataset_rejects_unknown_names() -> None:
    for name in ("cifar10", "imagefolder:", ""):
        with pytest.raises(PranceError, match="fashion-mnist, imagefolder:PATH"):
            build_dataset(name, "train", SPEC_1x28)
