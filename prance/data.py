"""Datasets, preprocessing and fast loaders.

Two sources of images:

* Fashion-MNIST, read straight from the original IDX files (Debian's
  ``dataset-fashion-mnist`` package, a folder named by ``PRANCE_FASHION_MNIST``, or the
  torchvision download) and held in memory as uint8 tensors.  Preprocessing runs on
  whole batches (``TensorImageDataset.batch``), so a loader over the 10,000 test images
  costs a few milliseconds per batch.
* ImageNet-style folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``),
  read with torchvision's ``ImageFolder`` and timm's transforms.

Every random choice (subsets, splits, shuffling) takes an explicit seed and uses its own
``torch.Generator``; the global RNG is never touched.
"""

from __future__ import annotations

import functools
import gzip
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset

from prance.errors import PranceError

FASHION_MNIST_ENV = "PRANCE_FASHION_MNIST"
FASHION_MNIST_CACHE = Path("~/.cache/prance/fashion-mnist").expanduser()
FASHION_MNIST_DIRS: tuple[Path, ...] = tuple(
    [Path(os.environ[FASHION_MNIST_ENV]).expanduser()] if os.environ.get(FASHION_MNIST_ENV) else []
) + (Path("/usr/share/datasets/fashion-mnist"), FASHION_MNIST_CACHE)
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> big-endian numpy dtype (the format's own element types).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
    """Return the file's content, gunzipped when it starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PranceError(f"cannot read IDX file {path}: {exc.strerror or exc}") from exc
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise PranceError(f"corrupt gzip data in IDX file {path}: {exc}") from exc


def parse_idx(data: bytes, name: str = "<bytes>") -> torch.Tensor:
    """Parse the bytes of an (uncompressed) IDX file into a tensor of its dtype and shape.

    The header is two zero bytes, a type code (0x08 uint8 ... 0x0E float64), the number of
    dimensions, then one big-endian uint32 per dimension; the data follow, big-endian.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise PranceError(f"{name} is not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(data[2])
    if dtype is None:
        raise PranceError(f"{name}: unknown IDX element type code 0x{data[2]:02x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PranceError(f"{name}: truncated IDX header ({len(data)} bytes, expected {header})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise PranceError(
            f"{name}: IDX file {what}: {len(data)} bytes, header {list(shape)} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (gzipped or not) into a tensor; PranceError when corrupt or truncated."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


# ----------------------------------------------------------------------- Fashion-MNIST


def _normalise_split(split: str) -> str:
    """Map a user split name to "train" or "test" ("val" is an alias of "test")."""
    key = split.strip().lower()
    if key in ("train", "training"):
        return "train"
    if key in ("test", "val", "validation", "eval"):
        return "test"
    raise PranceError(f"unknown split {split!r}: use 'train' or 'test' (alias 'val')")


def _idx_candidates(folder: Path, stem: str) -> list[Path]:
    """The places a file named ``stem`` (optionally .gz) may sit under ``folder``.

    torchvision's download writes to ``<root>/FashionMNIST/raw``; Debian and manual copies
    put the files directly in the folder.
    """
    places = (folder, folder / "FashionMNIST" / "raw")
    return [place / f"{stem}{ext}" for place in places for ext in (".gz", "")]


def _find_fashion_mnist(split: str, folders: Sequence[Path]) -> tuple[Path, Path] | None:
    """Return (images, labels) paths of the first folder holding both files, else None."""
    prefix = _FASHION_MNIST_PREFIX[split]
    for folder in folders:
        images = [p for p in _idx_candidates(folder, f"{prefix}-images-idx3-ubyte") if p.is_file()]
        labels = [p for p in _idx_candidates(folder, f"{prefix}-labels-idx1-ubyte") if p.is_file()]
        if images and labels:
            return images[0], labels[0]
    return None


@functools.lru_cache(maxsize=8)
def _load_idx_pair(images_path: Path, labels_path: Path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check one Fashion-MNIST split (cached per file pair)."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != torch.uint8 or images.shape != (count, 28, 28):
        raise PranceError(
            f"{images_path}: expected uint8 images of shape ({count}, 28, 28), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if labels.shape != (count,):
        raise PranceError(f"{labels_path}: expected {count} labels, got shape {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    if int(labels.min()) < 0 or int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise PranceError(f"{labels_path}: labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels


def _torchvision_download(split: str, folder: Path) -> str | None:
    """Try torchvision's Fashion-MNIST download into ``folder``; return an error text or None."""
    try:
        from torchvision.datasets import FashionMNIST

        folder.mkdir(parents=True, exist_ok=True)
        FashionMNIST(str(folder), train=split == "train", download=True)
    except Exception as exc:  # no internet, proxy, disk full...: report, never crash here
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def load_fashion_mnist(
    split: str, root: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return Fashion-MNIST ``(images uint8 [N,28,28], labels int64 [N])`` for a split.

    ``split`` is "train" (60,000 images) or "test" (10,000; "val" is accepted as alias).
    Looks in ``root`` when given, else in ``FASHION_MNIST_DIRS``; when the files are not
    found and ``download`` is true, tries the torchvision download (into ``root``, or
    ``~/.cache/prance/fashion-mnist``).  Loaded splits are cached in-process: the returned
    tensors are shared between callers and must not be modified in place.
    """
    split = _normalise_split(split)
    folders = (Path(root).expanduser(),) if root is not None else FASHION_MNIST_DIRS
    found = _find_fashion_mnist(split, folders)
    failure = None
    if found is None and download:
        target = folders[0] if root is not None else FASHION_MNIST_CACHE
        failure = _torchvision_download(split, target)
        found = _find_fashion_mnist(split, (target,))
    if found is None:
        where = ", ".join(str(f) for f in folders)
        tried = f" (download failed: {failure})" if failure else " (download disabled)" if not download else ""
        raise PranceError(
            f"Fashion-MNIST {split} files not found in {where}{tried}; get them with "
            f"`apt-get install dataset-fashion-mnist` (Debian), or allow internet access for the "
            f"torchvision download into {FASHION_MNIST_CACHE}, or set {FASHION_MNIST_ENV} to a "
            f"folder holding the IDX files"
        )
    return _load_idx_pair(found[0], found[1], FASHION_MNIST_SIZES[split])


# ------------------------------------------------------------------------ preprocessing


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input: channels, size, normalisation and resampling."""

    in_chans: int
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.in_chans < 1 or len(self.img_size) != 2 or min(self.img_size) < 1:
            raise PranceError(f"invalid input spec: {self.in_chans} channels, size {self.img_size}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.in_chans):
                raise PranceError(f"input spec {name} has {len(values)} values for {self.in_chans} channels")
        if any(s <= 0 for s in self.std):
            raise PranceError(f"input spec std must be positive, got {self.std}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise PranceError(f"input spec crop_pct must be in (0, 1], got {self.crop_pct}")


FASHION_MNIST_SPEC = InputSpec(1, (28, 28), FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def _built_input_shape(model: torch.nn.Module) -> tuple[int | None, tuple[int, int] | None]:
    """The channels and image size a timm ViT was actually built with (None when unknown)."""
    patch_embed = getattr(model, "patch_embed", None)
    # the model's own in_chans (a hybrid ViT's proj conv reads stem features, not pixels)
    in_chans = getattr(model, "in_chans", None) or getattr(getattr(patch_embed, "proj", None), "in_channels", None)
    img_size = getattr(patch_embed, "img_size", None)
    if not (isinstance(img_size, (tuple, list)) and len(img_size) == 2):
        img_size = None
    return (int(in_chans) if in_chans else None), (tuple(int(s) for s in img_size) if img_size else None)


def _fit_stats(values: Sequence[float], in_chans: int, name: str) -> tuple[float, ...]:
    """Fit per-channel mean/std to ``in_chans`` (one value broadcasts; colour stats average to grey)."""
    values = tuple(float(v) for v in values)
    if len(values) in (1, in_chans):
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    raise PranceError(f"model data config {name} has {len(values)} values for {in_chans} channels")


def input_spec_for_model(model: torch.nn.Module) -> InputSpec:
    """Read a timm model's data config (input size, mean, std, interpolation, crop_pct).

    timm's config comes from the model's pretrained_cfg, which keeps the registered
    architecture's values (e.g. 3x224x224) even when the model was built with another
    ``img_size``/``in_chans``; the channels and size the patch embedding was built with win.
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    cfg_chans, cfg_height, cfg_width = cfg["input_size"]
    built_chans, built_size = _built_input_shape(model)
    in_chans = built_chans or int(cfg_chans)
    return InputSpec(
        in_chans=in_chans,
        img_size=built_size or (int(cfg_height), int(cfg_width)),
        mean=_fit_stats(cfg["mean"], in_chans, "mean"),
        std=_fit_stats(cfg["std"], in_chans, "std"),
        interpolation=str(cfg.get("interpolation") or "bilinear"),
        crop_pct=float(cfg.get("crop_pct") or 1.0),
    )


def _resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Resize float images [N,C,H,W] in [0,1]; antialiased when a smooth filter shrinks them."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}.get(interpolation, "bilinear")
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=shrinking)
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


def _match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Repeat grey images to ``in_chans`` channels, or average colour ones to grey."""
    have = x.shape[1]
    if have == in_chans:
        return x
    if have == 1:
        return x.expand(-1, in_chans, -1, -1)
    if in_chans == 1:
        return x.mean(dim=1, keepdim=True)
    raise PranceError(f"images have {have} channels but the model expects {in_chans}")


def preprocess(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Turn uint8 images [N,H,W] or [N,C,H,W] into normalised float [N,C,H,W] for ``spec``.

    Steps: scale to [0,1], resize to ``spec.img_size``, match channels, normalise; on the
    images' device. On images :func:`held_images` decoded from a folder (already resized
    and cropped) it does what timm's ``ToTensor`` + ``Normalize`` do, op for op.
    """
    x = images.unsqueeze(1) if images.dim() == 3 else images
    x = x.to(torch.float32).div_(255.0)
    x = _resize(x, spec.img_size, spec.interpolation)
    x = _match_channels(x, spec.in_chans)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class TensorImageDataset(Dataset):
    """In-memory uint8 images plus labels, preprocessed on access for an ``InputSpec``.

    ``dataset[i]`` gives ``(float [C,H,W], int label)``; ``dataset.batch(indices)`` gives
    ``(float [B,C,H,W], int64 [B])`` in one vectorised step (what ``make_loader`` uses).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: InputSpec,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise PranceError(f"images must be uint8 [N,H,W] or [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise PranceError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.spec = spec
        self.classes = tuple(classes) if classes is not None else None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        return preprocess(self.images[index : index + 1 or None], self.spec)[0], int(self.labels[index])

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocess the images at ``indices`` together; return ``(x, y)``."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return preprocess(self.images[idx], self.spec), self.labels[idx]


def fashion_mnist(
    split: str, spec: InputSpec, root: str | os.PathLike[str] | None = None
) -> TensorImageDataset:
    """Fashion-MNIST ``split`` ("train" or "test") as a dataset preprocessed for ``spec``."""
    images, labels = load_fashion_mnist(split, root)
    return TensorImageDataset(images, labels, spec, FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------ image folders


DECODED = {"images": 0}  # image files this process opened (tests count what planning decodes)


SKIP_BAD_FLAG = "--skip-bad-images"


def _open_image(path: str, mode: str, skip_bad: bool | None = None) -> Any:
    """Open an image file with PIL and convert it to ``mode`` ("L" or "RGB"). An unreadable
    file (truncated, not an image) is a PranceError naming it; with ``skip_bad`` a warning
    line on stderr and None (the loader's collate function drops the item). The error
    names the remedy the command has: ``skip_bad=False`` (a command that offers
    :data:`SKIP_BAD_FLAG`, not given) names the flag, ``None`` (no such flag) says to remove
    or replace the file."""
    from PIL import Image

    DECODED["images"] += 1
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's UnidentifiedImageError is an OSError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        if skip_bad is None:
            raise PranceError(f"unreadable image {path} ({reason}): remove or replace the file") from None
        if not skip_bad:
            raise PranceError(f"unreadable image {path} ({reason}); pass {SKIP_BAD_FLAG} to skip such files and count them") from None
        print(f"warning: skipping unreadable image {path} ({reason})", file=sys.stderr, flush=True)
        return None


def _transform_or_none(transform: Any, image: Any) -> Any:
    """``transform(image)``; None stays None (an image skipped by :func:`_open_image`)."""
    return None if image is None else transform(image)


def _collate_readable(batch: list) -> Any:
    """Default collation of the items whose image could be read (skipped ones are None)."""
    from torch.utils.data import default_collate

    items = [b for b in batch if not (isinstance(b, (tuple, list)) and b and b[0] is None)]
    if not items:
        raise PranceError(f"all {len(batch)} images of a batch are unreadable (see the warnings above)")
    return default_collate(items)


def _split_folder(root: Path, split: str) -> Path:
    """Locate the folder of ``split`` under ``root`` ("test" and "val" stand in for each other)."""
    key = split.strip().lower()
    names = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}.get(key)
    if names is None:
        raise PranceError(f"unknown split {split!r}: use 'train', 'val' or 'test'")
    if not root.is_dir():
        raise PranceError(f"image folder {root} does not exist")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise PranceError(f"image folder {root} has no {' or '.join(n + '/' for n in names)} subfolder")


def _timm_transform(spec: InputSpec, train: bool) -> Any:
    from timm.data import create_transform

    return create_transform(input_size=(spec.in_chans, *spec.img_size), is_training=train, mean=spec.mean, std=spec.std,
                            interpolation=spec.interpolation, crop_pct=spec.crop_pct)


def _to_uint8(image: Any) -> torch.Tensor:
    """A PIL image as a uint8 tensor [C,H,W] (what ``ToTensor`` reads, before it scales)."""
    array = torch.from_numpy(np.array(image, np.uint8, copy=True))
    return array.unsqueeze(0) if array.dim() == 2 else array.permute(2, 0, 1).contiguous()


def decode_transform(spec: InputSpec) -> Any:
    """timm's evaluation transform for ``spec`` up to its ``ToTensor`` and ``Normalize``
    (resize and centre crop), ending in a uint8 tensor [C,H,W]: 0.14 MiB per 3x224x224
    image instead of float32's 0.57 MiB. :func:`preprocess` does the rest per batch."""
    from torchvision.transforms import Compose

    steps = list(_timm_transform(spec, False).transforms)
    tail = [type(t).__name__ for t in steps[-2:]]
    if tail not in (["ToTensor", "Normalize"], ["MaybeToTensor", "Normalize"]):
        raise RuntimeError(f"timm's evaluation transform no longer ends in ToTensor, Normalize: {steps}")
    return Compose([*steps[:-2], _to_uint8])


def image_folder(root: str | os.PathLike[str], split: str, spec: InputSpec, train: bool = False, skip_bad: bool | None = None,
                 uint8: bool = False) -> Dataset:
    """An ImageNet-style folder ``root/<split>/<class>/<image>`` as a torchvision ImageFolder.

    ``split`` is "train" or "val" ("test" is accepted when only one of test/ and val/ exists).
    Images go through timm's transform for ``spec`` (training augmentation when ``train``);
    they are read as grey when the model takes one channel, else as RGB. ``uint8``: items
    are resized and cropped uint8 images (:func:`decode_transform`), not normalised floats.
    An unreadable image is a PranceError naming it, or with ``skip_bad`` a warning and an
    item the loader of :func:`make_loader` leaves out (``False``: the command offers
    ``--skip-bad-images`` and the error says so; ``None``: it offers no skipping).
    """
    from torchvision.datasets import ImageFolder

    if uint8 and train:
        raise ValueError("uint8 images are evaluation images: no augmentation")
    folder = _split_folder(Path(root).expanduser(), split)
    transform = decode_transform(spec) if uint8 else _timm_transform(spec, train)
    mode = "L" if spec.in_chans == 1 else "RGB"
    try:
        return ImageFolder(
            str(folder),
            transform=functools.partial(_transform_or_none, transform),
            loader=functools.partial(_open_image, mode=mode, skip_bad=skip_bad),
        )
    except FileNotFoundError as exc:
        raise PranceError(f"image folder {folder}: no class subfolders with images ({exc})") from exc


# ------------------------------------------------------------------------------ lookup


DATASET_FORMS = ("fashion-mnist", "imagefolder:PATH")


def build_dataset(name: str, split: str, spec: InputSpec, train: bool = False, skip_bad: bool | None = None,
                  uint8: bool = False) -> Dataset:
    """Build a dataset by name: ``"fashion-mnist"`` or ``"imagefolder:PATH"``.

    ``split`` is "train" or "test"/"val".  ``train`` turns on augmentation for image
    folders; Fashion-MNIST tensors are served without augmentation. ``skip_bad``: an
    image folder's unreadable images are skipped with a warning (else a PranceError naming
    ``--skip-bad-images`` when ``False``, the command's flag left out, and the file alone when ``None``).
    ``uint8``: an image folder's items are uint8 images for :func:`held_images`.
    Building a dataset lists files; it decodes no image.
    """
    key = name.strip()
    if key.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return fashion_mnist(split, spec)
    if key.lower().startswith("imagefolder:") and key[len("imagefolder:") :].strip():
        return image_folder(key[len("imagefolder:") :].strip(), split, spec, train=train, skip_bad=skip_bad, uint8=uint8)
    raise PranceError(f"unknown dataset {name!r}: use one of {', '.join(DATASET_FORMS)}")


# ------------------------------------------------------------------ subsets and loaders


def _generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(int(seed))


def seeded_subset(dataset: Dataset, n: int | None, seed: int) -> Subset:
    """``n`` items of ``dataset`` chosen at random with ``seed``; all, in order, when n is None or >= len."""
    size = len(dataset)
    if n is None or n >= size:
        return Subset(dataset, list(range(size)))
    if n < 1:
        raise PranceError(f"subset size must be at least 1, got {n}")
    return Subset(dataset, torch.randperm(size, generator=_generator(seed))[:n].tolist())


def train_val_split(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Split ``dataset`` at random (``seed``) into disjoint (train, val) subsets covering it.

    Each part keeps the dataset's order; the val part holds ``round(len * val_fraction)``
    items, at least one, and the train part at least one.
    """
    if not 0.0 < val_fraction < 1.0:
        raise PranceError(f"val_fraction must be in (0, 1), got {val_fraction}")
    size = len(dataset)
    if size < 2:
        raise PranceError(f"cannot split a dataset of {size} item(s) into train and val")
    n_val = min(max(round(size * val_fraction), 1), size - 1)
    perm = torch.randperm(size, generator=_generator(seed))
    val = sorted(perm[:n_val].tolist())
    train = sorted(perm[n_val:].tolist())
    return Subset(dataset, train), Subset(dataset, val)


HOLDOUT_SEED = 4242  # fixed, so that a checkpoint's held-out images can be found again from its config


def pretrain_holdout(dataset: Dataset, fraction: float) -> tuple[Subset, Subset]:
    """(pretraining images, held-out images) of a train split: the held-out part, never
    seen by pretraining, is where selectors can validate and take rollouts while the
    whole test split stays for the final numbers. The same ``fraction`` always gives the
    same split (:data:`HOLDOUT_SEED`)."""
    return train_val_split(dataset, fraction, HOLDOUT_SEED)


def _tensor_source(dataset: Dataset) -> tuple[TensorImageDataset, list[int]] | None:
    """If ``dataset`` is a TensorImageDataset or (nested) Subset of one, return it and the index map."""
    if isinstance(dataset, TensorImageDataset):
        return dataset, list(range(len(dataset)))
    if isinstance(dataset, Subset):
        inner = _tensor_source(dataset.dataset)
        if inner is not None:
            base, mapping = inner
            return base, [mapping[int(i)] for i in dataset.indices]
    return None


def _collate_tensor_batch(base: TensorImageDataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function of the fast path: the batch's base indices -> preprocessed batch."""
    return base.batch(indices)


def one_thread_worker(_worker_id: int) -> None:
    """``worker_init_fn`` of loader workers: one torch thread each. Per-image transforms
    gain nothing from intra-op threads, and several workers each with the default thread
    count fight for the cores (per-image ops measured ~16x slower on 2 busy cores)."""
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader yielding ``(x, y)`` batches; shuffling is seeded by ``seed``.

    The same seed gives the same order epoch by epoch.  For a TensorImageDataset (or a
    Subset of one) the loader samples index batches and preprocesses each batch in one
    vectorised call instead of item by item.  ``sampler`` (positions in ``dataset``)
    replaces the sequential/shuffled order, e.g. a :class:`EpochShardSampler`.  With
    ``num_workers`` > 0 every worker runs one torch thread (:func:`one_thread_worker`) and
    ``persistent_workers`` / ``prefetch_factor`` apply; ``pin_memory`` for CUDA copies.
    """
    if batch_size < 1:
        raise PranceError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise PranceError(f"num_workers must be >= 0, got {num_workers}")
    workers = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        workers.update(worker_init_fn=one_thread_worker, persistent_workers=persistent_workers,
                       prefetch_factor=prefetch_factor)
    source = _tensor_source(dataset)
    if source is None:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            drop_last=drop_last,
            generator=_generator(seed),
            collate_fn=_collate_readable,
            **workers,
        )
    base, mapping = source
    # The "dataset" seen by the DataLoader is the index map itself: the batch sampler picks
    # positions, the fetcher turns them into base indices, the collate function preprocesses.
    if sampler is None:
        sampler = RandomSampler(mapping, generator=_generator(seed)) if shuffle else SequentialSampler(mapping)
    return DataLoader(
        mapping,
        batch_sampler=BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last),
        collate_fn=functools.partial(_collate_tensor_batch, base),
        generator=_generator(seed),
        **workers,
    )


class EpochShardSampler(Sampler):
    """Worker ``rank`` of ``world``'s share of an epoch: the ``n`` positions permuted with
    ``seed + epoch``, then every ``world``-th from ``rank`` (disjoint shards that cover the
    epoch). ``set_epoch`` moves it on, so one loader (and its persistent workers) serves
    every epoch."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=_generator(self.seed + self.epoch)).tolist()
        return iter(order[self.rank :: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


# ------------------------------------------------------------------ images held as uint8

DECODE_BATCH = 64


def decode_workers(n_images: int) -> int:
    """Loader processes for decoding ``n_images``: none for a few hundred, else one per
    core up to 8 (each runs one torch thread, :func:`one_thread_worker`)."""
    return 0 if n_images < 512 else min(8, os.cpu_count() or 1)


def held_images(dataset: Dataset, indices: Sequence[int], workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``indices`` of ``dataset`` as they are held in memory: uint8 [N,C,H,W]
    and int64 labels [N]. A model reads them directly: the meta-network scales, resizes
    and normalises each batch on its device (:func:`preprocess`, called by
    ``prance.models.engine.stem``), with the same values as the float path.

    ``dataset``: a TensorImageDataset (its uint8 images are indexed) or a dataset of uint8
    items (``image_folder(..., uint8=True)``), decoded by ``workers`` loader processes
    (default :func:`decode_workers`) into one preallocated array: no float copy, no
    concatenation of batches."""
    if isinstance(dataset, TensorImageDataset):
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        x = dataset.images[idx]
        return (x.unsqueeze(1) if x.dim() == 3 else x), dataset.labels[idx]
    n = len(indices)
    workers = decode_workers(n) if workers is None else workers
    loader = make_loader(Subset(dataset, list(indices)), batch_size=DECODE_BATCH, num_workers=workers,
                         prefetch_factor=4 if workers else None)
    x = y = None
    at = 0
    for xb, yb in loader:
        if xb.dtype != torch.uint8:
            raise ValueError(f"held_images needs a dataset of uint8 images, got {xb.dtype}")
        if x is None:
            x, y = torch.empty((n, *xb.shape[1:]), dtype=torch.uint8), torch.empty(n, dtype=torch.int64)
        x[at : at + len(xb)] = xb
        y[at : at + len(xb)] = yb
        at += len(xb)
    if x is None:
        raise PranceError("no images to load")
    return x[:at], y[:at]  # fewer than n only when unreadable images were skipped
