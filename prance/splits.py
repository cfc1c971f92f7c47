"""Which images validate, roll out and test: one split, the same for every selector,
static search, cascade and sweep trial, so their numbers are on the same images.

All parts are disjoint. The test split is permuted once (:data:`TEST_SPLIT_SEED`): with
``rollouts_from: holdout`` the first ``val_limit`` images validate, the next
``train_limit`` are the rollout images, the rest are test images. With
``rollouts_from: train_holdout`` (``auto``'s choice for a checkpoint whose pretraining
held out train images) validation and rollout images come from the train images that
pretraining held out (:func:`prance.data.pretrain_holdout`, the split pretraining used),
and test images from the whole test split. ``train`` rolls out on the meta-network's own
training images, which teaches a selector how confident the network is on data it
memorised (docs/selector.md).

:func:`layout` works out the parts as index lists without decoding an image (what a
driver checks); :func:`load` decodes the parts asked for, once, into uint8 images
(:func:`prance.data.held_images`: resized and cropped, 0.14 MiB per 3x224x224 image) that
the meta-network normalises per batch on its device.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

import torch
from torch import Tensor

from prance.checkpoint import read_header
from prance.data import build_dataset, held_images, input_spec_for_model, pretrain_holdout
from prance.errors import PranceError

# The fixed permutation of the test split into validation, rollout and test images.
TEST_SPLIT_SEED = 1234
PARTS = ("val", "train", "test")  # train: the rollout images


@dataclass(frozen=True)
class SplitSpec:
    """The split's settings (the selector's ``val_limit``, ``train_limit``, ``test_limit``,
    ``rollouts_from`` and ``seed``, on ``dataset`` for the meta-network ``checkpoint``)."""

    dataset: str
    checkpoint: str
    val_limit: int = 1000
    train_limit: int | None = 4000
    test_limit: int | None = None
    rollouts_from: str = "auto"
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> "SplitSpec":
        """The split of a config carrying these fields (a SelectorConfig)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @classmethod
    def of_settings(cls, dataset: str, checkpoint: str, settings: dict) -> "SplitSpec":
        """The validation/rollout split of selector settings given as a dict (a sweep's
        shared ``selector:`` section), without test images."""
        keys = {k: settings[k] for k in ("val_limit", "train_limit", "rollouts_from", "seed") if k in settings}
        return cls(dataset=dataset, checkpoint=checkpoint, test_limit=None, **keys)

    def source(self) -> str:
        """``rollouts_from`` with ``auto`` resolved: ``train_holdout`` when the checkpoint's
        pretraining held out train images, else ``holdout``."""
        if self.rollouts_from != "auto":
            return self.rollouts_from
        return "train_holdout" if holdout_fraction(self.checkpoint) > 0 else "holdout"


def holdout_fraction(checkpoint: str) -> float:
    """The share of train images the checkpoint's pretraining held out (0: none)."""
    return float((read_header(checkpoint).get("info") or {}).get("config", {}).get("holdout_fraction") or 0.0)


@dataclass(frozen=True)
class Layout:
    """Each part as (dataset, indices into it): nothing decoded yet."""

    parts: dict  # part -> (dataset, list[int])
    source: str

    def sizes(self) -> dict[str, int]:
        return {k: len(v[1]) for k, v in self.parts.items()}


def layout(spec: SplitSpec, image_spec) -> Layout:
    """The parts of ``spec`` for images shaped by ``image_spec``; PranceError when the
    dataset is too small for them. Lists files, decodes nothing."""
    source = spec.source()
    if source == "train_holdout":
        return Layout(_train_holdout_parts(spec, image_spec), source)
    test = build_dataset(spec.dataset, "test", image_spec, uint8=True)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(TEST_SPLIT_SEED)).tolist()
    v_idx, rest = perm[: spec.val_limit], perm[spec.val_limit :]
    if source == "holdout":
        n = spec.train_limit or len(rest) // 2
        r_idx, rest = rest[:n], rest[n:]
        rollouts = (test, r_idx)
    else:
        train = build_dataset(spec.dataset, "train", image_spec, uint8=True)
        g = torch.Generator().manual_seed(spec.seed)
        rollouts = (train, torch.randperm(len(train), generator=g)[: spec.train_limit or len(train)].tolist())
    if not rest and spec.test_limit is not None:
        raise PranceError(f"val_limit {spec.val_limit} + train_limit {spec.train_limit} leave no test images ({len(test)} in the test split)")
    if len(v_idx) == 0 or len(rollouts[1]) == 0:
        raise PranceError(f"the test split ({len(test)} images) is too small for val_limit {spec.val_limit} and train_limit {spec.train_limit}")
    parts = {"train": rollouts, "val": (test, v_idx)}
    if spec.test_limit is not None:
        parts["test"] = (test, rest[: spec.test_limit])
    return Layout(parts, source)


def _train_holdout_parts(spec: SplitSpec, image_spec) -> dict:
    fraction = holdout_fraction(spec.checkpoint)
    if not fraction:
        raise PranceError(f"rollouts_from: train_holdout needs a checkpoint pretrained with holdout_fraction > 0; "
                          f"{spec.checkpoint} held out no train images (use rollouts_from: holdout)")
    held = pretrain_holdout(build_dataset(spec.dataset, "train", image_spec, uint8=True), fraction)[1]
    idx = held.indices
    n_rollouts = spec.train_limit or (len(idx) - spec.val_limit)
    if spec.val_limit + n_rollouts > len(idx):
        raise PranceError(f"val_limit {spec.val_limit} + train_limit {n_rollouts} exceed the checkpoint's "
                          f"{len(idx)} held-out train images")
    parts = {"val": (held.dataset, idx[: spec.val_limit]), "train": (held.dataset, idx[spec.val_limit : spec.val_limit + n_rollouts])}
    if spec.test_limit is not None:
        test = build_dataset(spec.dataset, "test", image_spec, uint8=True)
        parts["test"] = (test, list(range(min(spec.test_limit, len(test)))))
    return parts


def tensors(dataset, indices: list[int], workers: int | None = None) -> tuple[Tensor, Tensor]:
    """The images ``indices`` of a :func:`layout` part's ``dataset`` as (uint8 x, int64 y)
    tensors (:func:`prance.data.held_images`)."""
    return held_images(dataset, indices, workers)


def load_images(spec: SplitSpec, image_spec, parts: Iterable[str] = PARTS, workers: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The asked-for parts of the split (those the spec has: ``test`` only with a
    ``test_limit``) as (uint8 x, int64 y) tensors, for images shaped by ``image_spec``."""
    lay = layout(spec, image_spec)
    return {p: tensors(*lay.parts[p], workers) for p in parts if p in lay.parts}


def load(meta, spec: SplitSpec, parts: Iterable[str] = PARTS) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`load_images` for the meta-network ``meta``."""
    return load_images(spec, input_spec_for_model(meta.vit), parts)


# ------------------------------------------------------------- what MLflow records of a split

# a part's name in MLflow's dataset inputs and its context tag (what the run did with it)
PART_NAMES = {"val": ("validation", "validation"), "train": ("rollouts", "training"), "test": ("test", "testing")}


def _identity(dataset, indices: list[int]) -> tuple[bytes, str]:
    """(bytes that identify the images ``indices`` of ``dataset``, where its images are):
    in-memory images (Fashion-MNIST) by their pixels and labels; an image folder by each
    file's path under its root, size and label. Nothing is decoded."""
    import os
    from pathlib import Path

    if hasattr(dataset, "samples"):  # torchvision ImageFolder
        root = Path(dataset.root)
        lines = [f"{Path(p).relative_to(root)}\t{os.stat(p).st_size}\t{label}" for p, label in (dataset.samples[i] for i in indices)]
        return "\n".join(lines).encode(), root.resolve().as_uri()
    from prance.data import FASHION_MNIST_DIRS, _find_fashion_mnist

    idx = torch.as_tensor(indices, dtype=torch.int64)
    found = _find_fashion_mnist("test", FASHION_MNIST_DIRS)
    where = found[0].parent.resolve().as_uri() if found else "fashion-mnist"
    return dataset.images[idx].numpy().tobytes() + dataset.labels[idx].numpy().tobytes(), where


def inputs(spec: SplitSpec, image_spec, parts: Iterable[str] = ("val", "train")) -> dict[str, dict]:
    """Per part of the split, what an MLflow run records as its dataset input without a copy
    of the images: name (``fashion-mnist-validation``), digest (sha256 of the part's
    images, :func:`_identity`), source (their folder), the number of images and the
    context tag. Plain data (JSON), so a write queued while a server is away keeps it;
    :func:`prance.tracking.log_inputs` logs it. Lists files, decodes nothing."""
    import hashlib
    import json
    from pathlib import Path

    lay = layout(spec, image_spec)
    short = Path(spec.dataset.split(":", 1)[1]).name if spec.dataset.lower().startswith("imagefolder:") else spec.dataset
    out = {}
    for part in parts:
        if part not in lay.parts:
            continue
        dataset, indices = lay.parts[part]
        data, where = _identity(dataset, indices)
        name, context = PART_NAMES[part]
        out[part] = {"name": f"{short}-{name}", "digest": hashlib.sha256(data).hexdigest()[:16], "source_type": "local",
                     "source": json.dumps({"uri": where}), "context": context,
                     "profile": json.dumps({"images": len(indices), "rollouts_from": lay.source, "seed": spec.seed})}
    return out
