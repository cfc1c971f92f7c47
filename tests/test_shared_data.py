"""Issue 36: split images held once as uint8 (per node, in Ray's object store), the driver
decodes nothing, and the work the trials of one (strategy, budget) combo would repeat is
computed once. Real images (a generated JPEG folder, Fashion-MNIST), real Ray."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prance import splits
from prance.data import (DECODED, FASHION_MNIST_DIRS, InputSpec, build_dataset, held_images, image_folder, make_loader,
                         preprocess)
from prance.errors import PranceError

needs_fmnist = pytest.mark.skipif(not any((d / "t10k-images-idx3-ubyte.gz").exists() for d in FASHION_MNIST_DIRS),
                                  reason="Fashion-MNIST files not installed")
SPEC = InputSpec(3, (48, 48), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)


def jpeg_folder(root: Path, per_class: int, classes: int = 2, seed: int = 0, size: tuple[int, int] = (40, 90)) -> Path:
    """``root/val/c<k>/<i>.jpg``: colour JPEGs of random sizes (smooth noise, so that
    JPEG and the resize have something to do)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / "val" / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(*size, 2))
            small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(d / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    return jpeg_folder(tmp_path_factory.mktemp("jpegs"), per_class=30)


def test_uint8_images_normalise_to_the_float_path_exactly(jpegs):
    floats = image_folder(jpegs, "val", SPEC)  # timm's eval transform: resize, crop, ToTensor, Normalize
    xs, ys = zip(*make_loader(floats, batch_size=16))
    x_float, y_float = torch.cat(xs), torch.cat(ys)
    for workers in (0, 2):  # in-process and in loader worker processes
        x, y = held_images(image_folder(jpegs, "val", SPEC, uint8=True), list(range(len(floats))), workers=workers)
        assert x.dtype == torch.uint8 and tuple(x.shape) == (60, 3, 48, 48) and x.element_size() * x[0].numel() == 3 * 48 * 48
        assert torch.equal(preprocess(x, SPEC), x_float) and torch.equal(y, y_float)


@needs_fmnist
def test_split_parts_are_uint8_and_the_model_reads_them_as_the_floats(micro_checkpoint):
    from prance.checkpoint import load_checkpoint
    from prance.data import input_spec_for_model

    meta, _ = load_checkpoint(micro_checkpoint)
    spec = splits.SplitSpec("fashion-mnist", str(micro_checkpoint), val_limit=40, train_limit=20, rollouts_from="holdout")
    parts = splits.load(meta, spec)
    lay = splits.layout(spec, input_spec_for_model(meta.vit))
    for part, (x, y) in parts.items():
        dataset, idx = lay.parts[part]
        ref_x, ref_y = dataset.batch(idx)  # the float path: preprocessed floats
        assert x.dtype == torch.uint8 and x.shape[0] == len(idx)
        assert torch.equal(preprocess(x, input_spec_for_model(meta.vit)), ref_x) and torch.equal(y, ref_y)
    x, _ = parts["val"]
    x_float = preprocess(x, input_spec_for_model(meta.vit))
    with torch.no_grad():  # the meta-network normalises uint8 batches itself, full and sliced
        assert torch.equal(meta(x), meta(x_float))
        assert torch.equal(meta(x, meta.space.smallest()), meta(x_float, meta.space.smallest()))


def test_the_driver_never_decodes_an_image(tmp_path, micro_checkpoint):
    """Planning a sweep over a folder whose "images" cannot be decoded succeeds: it counts
    files only. Loading the same split then fails on the first file it opens."""
    from prance.sweep.config import SweepConfig
    from prance.sweep.plan import plan_sweep

    for c in range(2):
        d = tmp_path / "val" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(20):
            (d / f"{i}.jpg").write_bytes(b"not a jpeg " * 10)
    before = DECODED["images"]
    selector = {"val_limit": 12, "train_limit": 10, "rollouts_from": "holdout"}
    plan = plan_sweep(SweepConfig(checkpoint=str(micro_checkpoint), dataset=f"imagefolder:{tmp_path}", budgets=["60%"],
                                  strategies=["free_merge"], selector=selector))
    assert len(plan.trials) == 2 and DECODED["images"] == before
    with pytest.raises(PranceError, match="unreadable image"):
        from prance.checkpoint import load_checkpoint

        splits.load(load_checkpoint(micro_checkpoint)[0], splits.SplitSpec(f"imagefolder:{tmp_path}", str(micro_checkpoint), **selector))
    assert DECODED["images"] > before


# ----------------------------------------------------------------------------- real Ray


@pytest.fixture(scope="module")
def local_ray():
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the tasks below are this module's functions
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[1]))}})
    try:
        yield ray
    finally:
        ray.shutdown()


def _mapping_of(address: int) -> tuple[str, int]:
    """(file, inode) of this process's memory mapping holding ``address``."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= address < hi:
            return (fields[5] if len(fields) > 5 else ""), int(fields[4])
    raise AssertionError("address not mapped")


def _private_kib() -> int:
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean", "Private_Dirty")))


def _read_shared(name: str, spec, part: str) -> dict:
    import torch  # noqa: F401 -- imported before measuring

    from prance.sweep import shared

    before = _private_kib()
    x, y = shared.images(name, spec, SPEC, part)
    checksum = int(x.sum())  # every page touched
    return {"private_kib": _private_kib() - before, "bytes": x.numel(), "mapping": _mapping_of(x.data_ptr()),
            "checksum": checksum, "n": int(y.shape[0])}


def test_two_trials_on_a_node_read_one_shared_copy(local_ray, tmp_path):
    from prance.sweep import shared

    ray = local_ray
    root = jpeg_folder(tmp_path, per_class=300, size=(60, 120))
    spec = splits.SplitSpec(f"imagefolder:{root}", "unused", val_limit=500, train_limit=50, rollouts_from="holdout")
    handle, name = shared.start()
    read = ray.remote(num_cpus=1)(_read_shared)
    before = DECODED["images"]
    a, b = ray.get([read.remote(name, spec, "val"), read.remote(name, spec, "val")])
    assert DECODED["images"] == before  # decoded by a Ray task, not here
    assert a["n"] == b["n"] == 500 and a["bytes"] == 500 * 3 * 48 * 48 and a["checksum"] == b["checksum"]
    stats = ray.get(handle.stats.remote())
    assert [v for k, v in stats.items() if k.startswith("images-")] == [1]  # one decode for both
    # the same pages: both processes map the same object-store file and hold no copy of their own
    assert a["mapping"] == b["mapping"] and a["mapping"][1] != 0
    for r in (a, b):  # a copy would make all of it private; pages only one reader has touched yet count as
        # private too (a fresh-clone run measured 25.0%: 844 KiB of 3,375), hence half, not a quarter
        assert r["private_kib"] * 1024 < 0.5 * r["bytes"], r


@needs_fmnist
def test_a_warm_start_anchor_is_computed_once_per_combo(local_ray, micro_checkpoint, tmp_path):
    """Two selector trials of one (strategy, budget) combo with different tuned
    hyper-parameters, at the same time in separate Ray workers, and one trial at another
    budget: every anchor search and every baseline is computed once."""
    from prance.sweep import shared
    from prance.sweep.config import SweepConfig
    from prance.sweep.plan import plan_sweep
    from prance.sweep.trial import TrialContext, run_selector_trial

    ray = local_ray
    settings = {"val_limit": 60, "train_limit": 40, "rollouts_from": "holdout", "iterations": 1, "rollout_images": 16,
                "minibatch": 16, "eval_every": 1, "static_images": 40, "static_first_images": 20, "decision_blocks": [1, 2, 3]}
    plan = plan_sweep(SweepConfig(checkpoint=str(micro_checkpoint), budgets=["60%", "80%"], strategies=["merge"],
                                  selector=settings))
    cells = {c.budget: c for c in plan.combos if c.reachable}
    handle, name = shared.start()
    ctx = TrialContext(str(micro_checkpoint), "fashion-mnist", settings, static={"first_images": 20}, shared=name)

    def trial(cell, lr, i):
        out = run_selector_trial({**cell.as_config(), "actor_lr": lr, "trial_number": i}, ctx, lambda m, f: None,
                                 tmp_path / f"t{i}")
        return out.get("warm_start", ""), out["baseline_top1"]

    run = ray.remote(num_cpus=1, max_retries=0)(trial)
    got = ray.get([run.remote(cells["60%"], lr, i) for i, lr in enumerate((1e-4, 3e-3))] + [run.remote(cells["80%"], 1e-3, 2)])
    stats = ray.get(handle.stats.remote())
    anchors = {k: v for k, v in stats.items() if k.startswith("anchor-")}
    assert anchors and set(anchors.values()) == {1}, stats
    assert set(v for k, v in stats.items() if k.startswith("baseline-")) == {1} and sum(k.startswith("baseline-") for k in stats) == 2
    assert got[0] == got[1] and got[0][0], got  # the same warm start and baseline
    assert len(anchors) >= 2  # the other budget searched its own
