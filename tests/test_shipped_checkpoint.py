"""The meta-networks prance ships (every pretrained tag of its models: the first one and the
supernet), found by name: each loads, and its Top-1 on the fixed test subset is what the
record beside it says (so the record was made from this file)."""

import json

import pytest
import timm

from prance.checkpoint import load_checkpoint
from prance.data import build_dataset, input_spec_for_model, seeded_subset
from prance.models.zoo import shipped_checkpoint
from prance.train.export import subnet_top1


@pytest.mark.parametrize("tag", ["prance_vit_fmnist.base", "prance_vit_fmnist.supernet"])
def test_shipped_checkpoint_matches_its_record(tag):
    assert tag in timm.list_pretrained("prance_*")
    checkpoint = shipped_checkpoint(tag)
    record = json.loads(checkpoint.with_suffix(".json").read_text())
    model, header = load_checkpoint(f"timm:{tag}")
    assert header["model"] == record["model"] == "prance_vit_fmnist"
    fixed = record["fixed_subset"]
    test = build_dataset("fashion-mnist", "test", input_spec_for_model(model.vit))
    top1 = subnet_top1(model, seeded_subset(test, fixed["n"], fixed["seed"]))
    one_image = 100 / fixed["n"]
    assert top1["top1_largest"] == pytest.approx(fixed["top1_largest"], abs=one_image)
    assert top1["top1_smallest"] == pytest.approx(fixed["top1_smallest"], abs=one_image)
    # the targets, as recorded on the full test set
    assert record["test_top1"]["top1_largest"] >= 88.0
    assert record["test_top1"]["top1_smallest"] >= 86.0
    # no absolute path of the machine that trained it (issue 31): files are named relative to the checkout
    assert not [v for v in _strings(record) if v.startswith("/") or v.startswith("sqlite:////")]
    # a checkpoint that held out train images carries the leak check on that whole hold-out
    held = (record.get("config") or {}).get("holdout_fraction") or 0
    if held and "leak_check" in record:
        leak = record["leak_check"]
        assert leak["n_holdout"] == round(60000 * held) and leak["n_test"] == 10000
        for end in ("largest", "smallest"):
            row = leak["subnets"][end]
            assert row["gap"] == pytest.approx(row["top1_holdout"] - row["top1_test"])


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
