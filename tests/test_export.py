"""Exporting a pretraining run: every sub-network of the record on each batch decoded once,
the leak check on the checkpoint's hold-out beside the test split, no absolute path of
the training machine in the record; and the hold-out pretraining keeps out is the one
the export and the selectors read back from the checkpoint's header."""

import json
from pathlib import Path

import pytest
import torch

from prance.checkpoint import load_checkpoint, read_header, save_checkpoint
from prance.config import load_config
from prance.train.config import PretrainConfig
from prance.data import FASHION_MNIST_SPEC, TensorImageDataset, fashion_mnist, make_loader, pretrain_holdout, seeded_subset
from prance.models import create_meta
from prance.static_search import num_levels


class CountingImages(TensorImageDataset):
    """Fashion-MNIST images that count how many they preprocess (decode), all batches together."""

    def __init__(self, base: TensorImageDataset, n: int):
        super().__init__(base.images[:n], base.labels[:n], base.spec, base.classes)
        self.decoded = 0

    def batch(self, indices):
        self.decoded += len(indices)
        return super().batch(indices)


def test_the_record_decodes_each_image_once_for_all_subnetworks(micro_checkpoint):
    from prance.train.export import FIXED_SUBSET, measure

    model, _ = load_checkpoint(micro_checkpoint)
    base = fashion_mnist("test", FASHION_MNIST_SPEC)
    test, held = CountingImages(base, 500), CountingImages(fashion_mnist("train", FASHION_MNIST_SPEC), 200)
    m = measure(model, model, test, held, tolerance=100.0, n_random=2)  # levels + 2 random, x (dense, prune), + 2 float32
    rows = m["space"]["subnets"]
    assert len(rows) == num_levels(model.space) + 2
    assert test.decoded == len(test) and held.decoded == len(held)  # one decode per image, whatever the count
    assert m["use_half"] and m["fixed_subset"]["n"] == FIXED_SUBSET["n"]
    # the fixed subset is read off the same pass: it equals a fresh evaluation of those images
    from prance.train.export import subnet_top1

    fresh = subnet_top1(model, seeded_subset(test, FIXED_SUBSET["n"], FIXED_SUBSET["seed"]))
    assert fresh == {k: m["fixed_subset"][k] for k in fresh}
    leak = m["leak_check"]
    assert leak["n_holdout"] == 200 and leak["n_test"] == 500
    largest = leak["subnets"]["largest"]
    assert largest["name"] == f"level_{num_levels(model.space) - 1}"
    assert largest["top1_test"] == m["test_top1"]["top1_largest"]
    assert largest["gap"] == pytest.approx(largest["top1_holdout"] - largest["top1_test"])
    assert 0 < largest["gap_se"] < 5
    assert leak["validation_images"] == 200 and largest["top1_validation_part"] == largest["top1_holdout"]
    for r in rows:  # every row has its hold-out Top-1 (dense) beside the test split's
        assert 0 <= r["top1_holdout"] <= 100 and "top1" in r


def test_export_records_the_leak_check_and_no_absolute_path(tmp_path):
    """A checkpoint whose header records a hold-out and an absolute init_from, exported with
    a command full of absolute paths: the record has the leak check on the whole hold-out
    and names files only relative to the repository or by file name."""
    from prance.train.export import REPO_ROOT, export_run

    torch.manual_seed(0)
    run_dir = tmp_path / "machine-specific" / "run"
    init = tmp_path / "machine-specific" / "start.safetensors"
    cfg = load_config(PretrainConfig, "pretrain", "smoke", {"holdout_fraction": 0.1, "init_from": str(init),
                                                             "storage": str(tmp_path / "machine-specific")})
    save_checkpoint(run_dir / "best.safetensors", create_meta("prance_vit_micro"), "prance_vit_micro",
                    info={"epoch": 0, "config": cfg.model_dump()})
    out = tmp_path / "export" / "micro.safetensors"
    command = f"python sweeps/pretrain.py --storage {tmp_path} --export {out} --set init_from={REPO_ROOT / 'checkpoints' / 'x.safetensors'}"
    record = export_run(run_dir, out, command, "fashion-mnist", n_random=1, limit=300)
    text = out.with_suffix(".json").read_text()
    assert str(tmp_path) not in text and str(REPO_ROOT) not in text  # nothing machine-specific
    assert record["config"]["init_from"] == "start.safetensors"  # outside the repository: its file name
    assert "init_from=checkpoints/x.safetensors" in record["command"]  # inside: relative to it
    leak = json.loads(text)["leak_check"]
    assert leak["n_holdout"] == 300 and leak["n_test"] == 300 and record["space"]["n_images"] == 300
    assert set(leak["subnets"]) == {"largest", "smallest", "random_median"}
    assert record["space"]["random_top1_holdout"]["median"] >= 0
    load_checkpoint(out)  # the exported weights load


def test_a_checkpoint_with_a_holdout_never_trains_on_it(tmp_path):
    """The split pretraining trains on (prance.train.worker.pretrain_split, what the worker
    loop calls) and the hold-out read back from a checkpoint's header (the export's leak
    check, the selectors' train_holdout) are disjoint and together the train split; and
    every batch the worker's loader yields, every rank and epoch, comes from the former."""
    from prance.data import EpochShardSampler, _tensor_source
    from prance.train.export import checkpoint_holdout
    from prance.train.worker import pretrain_split, save_train_checkpoint

    cfg = load_config(PretrainConfig, "pretrain", "smoke", {"holdout_fraction": 0.1, "train_limit": None})
    model = create_meta("prance_vit_micro")
    opt = torch.optim.AdamW(model.parameters())
    save_train_checkpoint(tmp_path, model, cfg, opt, 0, 0, {"top1_largest": 0.0})
    header = read_header(tmp_path / "model.safetensors")
    spec = FASHION_MNIST_SPEC
    trained, held_at_training = pretrain_split(PretrainConfig.model_validate(header["info"]["config"]), spec)
    held = checkpoint_holdout(header, "fashion-mnist", spec)
    trained_idx, held_idx = set(_tensor_source(trained)[1]), set(_tensor_source(held)[1])
    assert held_idx == set(_tensor_source(held_at_training)[1]) == set(pretrain_holdout(trained.dataset, 0.1)[1].indices)
    assert len(held_idx) == 6000 and not trained_idx & held_idx and len(trained_idx | held_idx) == 60000
    # a train_limit draws from what is left, never from the hold-out
    limited, _ = pretrain_split(cfg.model_copy(update={"train_limit": 5000}), spec)
    assert not set(_tensor_source(limited)[1]) & held_idx
    # the loader the worker builds, as it builds it: 2 ranks x 2 epochs, all positions in the trained set
    seen = set()
    for rank in range(2):
        sampler = EpochShardSampler(len(limited), cfg.seed, rank, 2)
        loader = make_loader(limited, 256, drop_last=True, sampler=sampler)
        base_of = loader.dataset  # the fast path: positions -> base indices of the train split
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for positions in loader.batch_sampler:
                seen.update(base_of[p] for p in positions)
    assert seen and not seen & held_idx and seen <= set(_tensor_source(limited)[1])


def test_sharded_over_ray_tasks_the_record_is_the_same(micro_checkpoint):
    """Issue 36 part 5: the record's evaluation as Ray tasks over consecutive parts of the
    images (here 3 CPU tasks on a local Ray; on a cluster one per GPU) gives every job the
    same per-image correctness, in order, as the pass in this process."""
    import ray

    from prance.train.export import Devices, correct_per_image

    model, _ = load_checkpoint(micro_checkpoint)
    images = CountingImages(fashion_mnist("test", FASHION_MNIST_SPEC), 301)
    jobs = {"largest": (model, model.space.largest(), None), "smallest": (model, model.space.smallest(), None)}
    here = correct_per_image(jobs, images, batch_size=64)
    assert images.decoded == 301
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        assert Devices.of_cluster() == Devices()  # no GPU in the cluster: in this process
        plain = TensorImageDataset(images.images, images.labels, images.spec, images.classes)  # the class a worker can import
        sharded = correct_per_image(jobs, plain, batch_size=64, on=Devices(shards=3), exact=frozenset({"largest"}))
    finally:
        ray.shutdown()
    assert set(sharded) == set(jobs) and all(torch.equal(sharded[k], here[k]) for k in jobs)
    assert len(sharded["largest"]) == 301 and 0 < int(sharded["largest"].sum()) < 301
