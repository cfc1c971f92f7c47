"""From a sweep row to a model a user runs (issue 32): configuration strings, sweep rows,
MLflow URIs, exported static modules, ONNX graphs and cascades."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prance import flops, static_search
from prance.errors import PranceError


@pytest.fixture(scope="module")
def micro():
    from prance.models import create_meta

    torch.manual_seed(0)
    return create_meta("prance_vit_micro").eval()


def test_parse_is_the_inverse_of_describe(micro):
    budget = 0.45 * flops.gflops(micro.arch)
    cands = static_search.candidates(micro, budget)
    assert {c.strategy.name for c in cands} >= {"prune", "merge", "prune_merge", "ppt"}
    for c in cands:
        back = static_search.parse(c.describe(), micro)
        assert back.describe() == c.describe()
        assert back.subnet == c.subnet and back.levels == c.levels
        assert back.strategy.param_value == c.strategy.param_value  # exact, not describe's 4 digits
        assert back.plan.token_counts(micro.arch.num_tokens) == c.plan.token_counts(micro.arch.num_tokens)
        assert back.gflops == pytest.approx(c.gflops, rel=1e-12)


@pytest.mark.parametrize("text, words", [
    ("widths=0,0 merge r=2", "levels"),
    ("widths=0,0,1,9 merge r=2", "levels"),
    ("widths=0,0,1,1 tome r=2", "unknown token strategy"),
    ("widths=0,0,1,1 merge keep=0.5", "takes r=VALUE"),
    ("widths=0,0,1,1 none r=3", "takes no parameter"),
    ("widths=0,0,1,1 merge r=99", "r must be an integer in"),
    ("merge r=2", "is not"),
    ("widths=a,b merge", "comma-separated"),
])
def test_bad_configuration_strings_say_what_is_wrong(micro, text, words):
    with pytest.raises(PranceError, match=words) as e:
        static_search.parse(text, micro)
    assert "\n" not in str(e.value)


def test_parse_restores_keep_ratios_that_describe_rounds():
    """49 patches: calibration's keep 22/49 prints as 0.449, and ceil(0.449 * 49) = 23 != 22."""
    from prance.models import create_meta

    meta = create_meta("prance_vit_micro", img_size=49).eval()
    assert meta.arch.num_patches == 49
    cands = [c for c in static_search.candidates(meta, 0.5 * flops.gflops(meta.arch), ["prune"])]
    rounded = [c for c in cands if f"{c.strategy.keep:.4g}" != repr(c.strategy.keep)]
    assert rounded, "no keep ratio that describe() rounds"
    for c in rounded:
        assert static_search.parse(c.describe(), meta).strategy.keep == c.strategy.keep


# ------------------------------------------------------------------ a sweep's rows, run again

SWEEP = "s1"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, micro_checkpoint):
    """A sweep folder as the sweep leaves it (sweep.json, results.csv), its trials run by
    the sweep's own Ray-free trial bodies on the micro meta-network and real images: the
    dense reference, free_merge, static_merge, static_prune and a two-rung cascade at
    50%, and a short selector (prune) trial. Returns (storage, rows by trial number)."""
    from prance.sweep import report as rep
    from prance.sweep import store
    from prance.sweep.config import SWEEP_OWNED, SweepConfig
    from prance.sweep.plan import plan_sweep
    from prance.sweep.methods import run_trial
    from prance.sweep.trial import TrialContext

    storage = tmp_path_factory.mktemp("sweeps")
    cfg = SweepConfig.model_validate({
        "checkpoint": str(micro_checkpoint), "budgets": ["50%"],
        "strategies": ["free_merge", "static_merge", "static_prune", "cascade", "controller", "prune"],
        "selector": {"val_limit": 256, "train_limit": 128, "iterations": 2, "eval_every": 1, "rollout_images": 32,
                     "minibatch": 32, "ppo_epochs": 1, "batch_size": 64, "decision_blocks": [1, 2, 3]},
        "static": {"uniform_only": False, "first_images": 32},
        "cascade": {"rungs": [0.5, 1.0], "strategies": ["merge"], "max_rungs": 2, "margin": False},
        "controller": {"iterations": 4, "images_per_iteration": 64, "eval_every": 2, "imitation_epochs": 5},
    })
    plan = plan_sweep(cfg)
    ctx = TrialContext(checkpoint=plan.checkpoint, dataset=plan.dataset, selector=cfg.selector.model_dump(),
                       static=cfg.static.model_dump(), cascade=cfg.cascade.model_dump(), controller=cfg.controller.model_dump())
    rows = []
    for n, combo in enumerate(plan.trials):
        config = {**combo.as_config(), "trial_number": n}
        workdir = storage / SWEEP / f"trial_{n}"
        final = run_trial(config, ctx, lambda m, folder: None, workdir)
        row = {**config, "trial_id": f"t{n:04d}", "status": "finished", **{k: final[k] for k in rep.METRIC_COLUMNS if k in final}}
        if final.get("configuration"):
            row["param"] = final["configuration"]
        if combo.method == "selector":
            row["selector_path"] = str(workdir / "selector.safetensors")
        if combo.method == "controller":  # what the sweep's results table records: the file in the reported folder
            from prance.selector.passes import CONTROLLER_FILE

            row["selector_path"] = str(workdir / "controller" / CONTROLLER_FILE)
            row["gflops_max"] = final["gflops_max"]
        rows.append(row)
    store.write_settings(str(storage), SWEEP, {"name": SWEEP, "config": cfg.model_dump(
        exclude={"name": True, "storage": True, "selector": set(SWEEP_OWNED)})})
    df = rep.results_frame(rows, [])
    df.to_csv(store.report_folder(str(storage), SWEEP) / "results.csv", index=False)
    return str(storage), {int(r["trial_number"]): r for r in df.to_dict("records")}


def run_cli(capsys, *argv):
    import json

    from prance.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 and "--json" in argv else out), err


def test_sweep_rows_become_configurations_that_reproduce_their_top1(sweep):
    from prance.evaluate import evaluate
    from prance.selector.train import batches
    from prance.sweep import best, trial_row

    storage, rows = sweep
    methods = {r["method"] for r in rows.values()}
    assert methods == {"dense", "training_free", "static", "cascade", "controller", "selector"}
    for n, r in rows.items():
        got = trial_row(storage, SWEEP, n)
        if r["method"] == "selector":
            assert got.selector == r["selector_path"] and got.static is None
            continue
        if r["method"] == "controller":  # read back from its file, it runs as the trial measured it
            from prance.selector import passes

            assert got.controller.describe() == r["param"] and got.static is None and got.selector is None
            m = passes.evaluate(got.meta, got.controller, *got.validation_images())
            assert m["top1"] == pytest.approx(r["top1"], abs=1e-9) and m["gflops"] == pytest.approx(r["gflops"], rel=1e-9)
            continue
        if r["method"] == "cascade":  # the description the trial recorded is the cascade, thresholds exact
            from prance import cascade as casc

            assert got.cascade.describe() == r["param"] and got.static is None
            m = casc.evaluate(got.meta, got.cascade, *got.validation_images())
            assert m["top1"] == pytest.approx(r["top1"], abs=1e-9)
            assert m["gflops"] == pytest.approx(r["gflops"], rel=1e-9) and m["gflops_max"] == pytest.approx(r["gflops_max"], rel=1e-9)
            continue
        if r["method"] == "static":
            assert got.static.describe() == r["param"]
        x, y = got.validation_images()
        m = evaluate(got.meta, batches(x, y, 64), got.static.subnet, got.static.plan, progress=False)
        assert m["top1"] == pytest.approx(r["top1"], abs=1e-9), (n, r["method"])
        assert m["gflops"] == pytest.approx(r["gflops"], rel=1e-9)
    b = best(storage, SWEEP, "50%")
    within = [r for r in rows.values() if r["method"] != "dense" and r["within_budget"]]
    assert b.top1 == max(r["top1"] for r in within)
    assert best(storage, SWEEP, "50%", method="static").method == "static"


def test_eval_sweep_trial_and_eval_config_reproduce_the_row(sweep, capsys, micro_checkpoint):
    storage, rows = sweep
    n, row = next((n, r) for n, r in rows.items() if r["method"] == "static")
    rc, out, err = run_cli(capsys, "eval", "--sweep", SWEEP, "--trial", str(n), "--storage", storage, "--split", "sweep", "--json")
    assert rc == 0, err
    assert out["top1"] == pytest.approx(row["top1"], abs=1e-9) and out["configuration"] == row["param"]
    assert out["row_top1"] == pytest.approx(row["top1"])
    # the configuration string on its own, on the same test images as the sweep row
    common = ["--split", "test", "--limit", "300", "--json"]
    rc, by_row, err = run_cli(capsys, "eval", "--sweep", SWEEP, "--trial", str(n), "--storage", storage, *common)
    assert rc == 0, err
    rc, by_text, err = run_cli(capsys, "eval", "--config", row["param"], "--checkpoint", str(micro_checkpoint), *common)
    assert rc == 0, err
    assert by_text["top1"] == by_row["top1"] and by_text["gflops"] == by_row["gflops"]
    # the best row of the budget, a selector row included in the choice
    rc, out, err = run_cli(capsys, "eval", "--sweep", SWEEP, "--budget", "50%", "--best", "--storage", storage, "--split", "sweep", "--json")
    assert rc == 0, err
    top = max((r for r in rows.values() if r["method"] != "dense" and r["within_budget"]), key=lambda r: r["top1"])
    assert out["trial"] == top["trial_number"] and out["top1"] == pytest.approx(top["top1"], abs=1e-9)


def test_eval_of_a_cascade_row_and_its_text(sweep, capsys, micro_checkpoint):
    """A cascade row runs again from the row and from its description alone, with the
    per-image GFLOPs spread and the batch-1 latency."""
    storage, rows = sweep
    n, row = next((n, r) for n, r in rows.items() if r["method"] == "cascade")
    rc, out, err = run_cli(capsys, "eval", "--sweep", SWEEP, "--trial", str(n), "--storage", storage, "--split", "sweep",
                           "--latency-images", "5", "--json")
    assert rc == 0, err
    assert out["strategy"] == "cascade" and out["configuration"] == row["param"]
    assert out["top1"] == pytest.approx(row["top1"], abs=1e-9) and out["gflops_p95"] == pytest.approx(row["gflops_p95"], rel=1e-9)
    assert out["latency_images"] == 5 and 0 < out["latency_b1_median_ms"] <= out["latency_b1_p95_ms"]
    common = ["--split", "test", "--limit", "200", "--latency-images", "0", "--json"]
    rc, by_row, err = run_cli(capsys, "eval", "--sweep", SWEEP, "--trial", str(n), "--storage", storage, *common)
    assert rc == 0, err
    rc, by_text, err = run_cli(capsys, "eval", "--config", row["param"], "--checkpoint", str(micro_checkpoint), *common)
    assert rc == 0, err
    assert by_text["top1"] == by_row["top1"] and by_text["gflops"] == by_row["gflops"] and "latency_images" not in by_text


def test_eval_and_export_of_a_controller_row(sweep, capsys, tmp_path):
    """A multi-pass controller row runs again from its checkpoint, with its GFLOPs spread,
    passes and latency; it exports for PyTorch with the reason there is no ONNX graph."""
    import json

    storage, rows = sweep
    n, row = next((n, r) for n, r in rows.items() if r["method"] == "controller")
    rc, out, err = run_cli(capsys, "eval", "--sweep", SWEEP, "--trial", str(n), "--storage", storage, "--split", "sweep",
                           "--latency-images", "3", "--json")
    assert rc == 0, err
    assert out["strategy"] == "controller" and out["configuration"] == row["param"] and out["method"] == "controller"
    assert out["top1"] == pytest.approx(row["top1"], abs=1e-9) and out["gflops"] <= row["budget_gflops"] * (1 + 1e-9)
    assert 1 <= out["passes"] <= 3 and out["latency_b1_median_ms"] > 0
    rc, out, err = run_cli(capsys, "export", "--sweep", SWEEP, "--trial", str(n), "--storage", storage,
                           "--output", str(tmp_path / "ctl"), "--json")
    assert rc == 0, err
    assert out["kind"] == "controller" and out["onnx"] is None and "control flow" in out["why_no_onnx"]
    manifest = json.loads((tmp_path / "ctl" / "manifest.json").read_text())
    assert (tmp_path / "ctl" / manifest["controller"]).is_file() and (tmp_path / "ctl" / "meta.safetensors").is_file()


def test_eval_of_a_selector_row(sweep, capsys):
    storage, rows = sweep
    n, row = next((n, r) for n, r in rows.items() if r["method"] == "selector")
    rc, out, err = run_cli(capsys, "eval", "--sweep", SWEEP, "--trial", str(n), "--storage", storage, "--split", "sweep", "--json")
    assert rc == 0, err
    assert out["strategy"] == "selector:prune" and out["method"] == "selector"
    assert out["top1"] == pytest.approx(row["top1"], abs=1e-9)
    assert out["gflops"] <= out["gflops_p95"] <= out["gflops_max"] and out["latency_b1_median_ms"] > 0


@pytest.mark.parametrize("argv, words", [
    (["--config", "widths=0,0,1,1 tome r=3"], "unknown token strategy 'tome'"),
    (["--sweep", SWEEP, "--trial", "99"], "has no trial 99"),
    (["--sweep", "nope", "--trial", "0"], "no sweep 'nope'"),
    (["--sweep", SWEEP, "--budget", "42%", "--best"], "has no budget '42%'"),
    (["--sweep", SWEEP], "needs --trial N, or --budget B --best"),
])
def test_bad_rows_are_one_line(sweep, capsys, micro_checkpoint, argv, words):
    storage, _ = sweep
    where = ["--storage", storage] if "--sweep" in argv else ["--checkpoint", str(micro_checkpoint)]  # row flags need --sweep
    rc, out, err = run_cli(capsys, "eval", *where, *argv)
    assert rc == 2 and err.startswith("prance: error: ") and words in err and err.count("\n") == 1, err


# ------------------------------------------------------------------ MLflow URIs


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory, micro_checkpoint):
    """A real sqlite MLflow store holding the micro checkpoint as a run artifact and as
    version 1 of the registered model prance-micro."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("export-tests", artifact_location=(folder / "artifacts").as_uri())
    run = c.create_run(exp).info.run_id
    c.log_artifact(run, str(micro_checkpoint), "meta")
    c.set_terminated(run)
    c.create_registered_model("prance-micro")
    c.create_model_version("prance-micro", f"runs:/{run}/meta", run)
    return uri, run


def test_mlflow_uris_stand_for_checkpoints(mlflow_store, micro_checkpoint, capsys):
    uri, run = mlflow_store
    common = ["eval", "--config", "widths=1,1,1,1 merge r=3", "--limit", "128", "--json"]
    rc, local, err = run_cli(capsys, *common, "--checkpoint", str(micro_checkpoint))
    assert rc == 0, err
    for path in (f"runs:/{run}/meta/micro.safetensors", f"runs:/{run}/meta", "models:/prance-micro/1"):
        rc, out, err = run_cli(capsys, *common, "--checkpoint", path, "--mlflow-uri", uri)
        assert rc == 0, (path, err)
        assert out["top1"] == local["top1"]


@pytest.mark.parametrize("path, store, words", [
    ("runs:/0123456789abcdef/meta", None, "cannot fetch checkpoint runs:/0123456789abcdef/meta"),
    ("models:/no-such-model/1", None, "cannot fetch checkpoint models:/no-such-model/1"),
    ("runs:/0123456789abcdef/meta", "sqlite:////nonexistent/mlflow.db", "does not exist"),
    ("runs:/0123456789abcdef/meta", "http://127.0.0.1:{port}", "unreachable"),
])
def test_bad_mlflow_uris_are_one_line(mlflow_store, capsys, path, store, words):
    from conftest import free_port

    uri = (store or mlflow_store[0]).format(port=free_port())
    rc, out, err = run_cli(capsys, "eval", "--config", "widths=1,1,1,1 none", "--checkpoint", path, "--mlflow-uri", uri)
    assert rc == 2 and err.startswith("prance: error: ") and words in err and err.count("\n") == 1, err


# ------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def decisive_checkpoint(tmp_path_factory, decisive_micro):
    from prance.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("decisive") / "decisive.safetensors", decisive_micro, "prance_vit_micro")


def _export(capsys, checkpoint, out, *what):
    rc, res, err = run_cli(capsys, "export", *what, "--checkpoint", str(checkpoint), "--output", str(out),
                           "--check-limit", "1000", "--json")
    assert rc == 0, err
    return res


def _check_onnx(res):
    assert res["check_images"] == 1000
    assert res["onnxruntime_max_abs_diff"] < 1e-4 and res["torch_max_abs_diff"] < 1e-4
    assert res["onnxruntime_predictions_differ"] == 0 and res["torch_predictions_differ"] == 0
    assert res["onnxruntime_top1"] == res["meta_top1"] == res["torch_top1"]


def test_exported_static_configuration_matches_the_meta_network(tmp_path, capsys, decisive_checkpoint, decisive_micro):
    """The sliced module (safetensors, smaller than the meta-network's file) and its ONNX
    graph under onnxruntime give the meta-network's logits on 1,000 real test images."""
    from prance.export import static

    text = "widths=0,1,0,1 merge r=3"
    res = _export(capsys, decisive_checkpoint, tmp_path / "m", "--config", text)
    _check_onnx(res)
    assert res["configuration"] == text
    assert res["weights_bytes"] < 0.8 * res["meta_bytes"] and res["parameters"] < res["meta_parameters"]
    module = static.load(tmp_path / "m")
    assert not any("vit" in k for k in module.state_dict())  # no meta-network inside
    x = torch.randn(5, 1, 28, 28)
    c = static_search.parse(text, decisive_micro)
    with torch.no_grad():
        assert torch.equal(module(x), decisive_micro(x, c.subnet, c.plan))


def test_export_compile_checks_the_compiled_module_and_load_compiles_it(tmp_path, capsys, decisive_checkpoint):
    """export --compile BACKEND: the sliced module under torch.compile, as one graph
    (fullgraph: a graph break fails), gives the meta-network's logits on real test images,
    and static.load compiles it with the backend the manifest records. PPT is the strategy
    with a per-image branch (torch.where in the sliced module). The backend here is
    aot_eager: dynamo's capture and AOT tracing, where a graph break or a data-dependent
    shape fails, without inductor's C++ build (10 minutes for the micro model on this loaded
    2-core machine; docs/export.md)."""
    from prance.export import static

    out = tmp_path / "m"
    rc, res, err = run_cli(capsys, "export", "--config", "widths=1,1,1,1 ppt r=4", "--checkpoint", str(decisive_checkpoint),
                           "--output", str(out), "--no-onnx", "--compile", "aot_eager", "--check-limit", "300", "--json")
    assert rc == 0, err
    assert res["torch_compile"] == "aot_eager" and res["compile_s"] > 0 and res["check_images"] == 300
    assert res["compiled_max_abs_diff"] < 1e-4 and res["compiled_predictions_differ"] == 0
    assert res["compiled_top1"] == res["meta_top1"] == res["torch_top1"]
    loaded, eager = static.load(out), static.load(out, compile=False)
    assert isinstance(loaded, torch._dynamo.eval_frame.OptimizedModule) and isinstance(eager, static.StaticViT)
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), eager(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("text", ["widths=2,2,2,2 none", "widths=1,0,1,0 prune keep=0.5", "widths=0,0,0,1 prune_merge keep=0.375",
                                  "widths=1,1,1,1 ppt r=4"])
def test_every_token_strategy_exports_to_onnx(tmp_path, capsys, decisive_checkpoint, text):
    _check_onnx(_export(capsys, decisive_checkpoint, tmp_path / "m", "--config", text))


def test_exported_cascade_gives_the_cascades_predictions(tmp_path, capsys, decisive_checkpoint, decisive_micro):
    """Three graphs + thresholds + manifest + runner; the runner, a standalone script run in
    a fresh process, gives the library cascade's predictions and passes."""
    import json
    import subprocess
    import sys

    import numpy as np

    from prance import cascade as casc

    from prance.data import build_dataset, input_spec_for_model, make_loader, seeded_subset

    cheap = "widths=0,0,0,0 merge r=4"
    ds = seeded_subset(build_dataset("fashion-mnist", "test", input_spec_for_model(decisive_micro.vit)), 1000, 0)
    x_test = next(iter(make_loader(ds, batch_size=1000)))[0]
    p = casc.logits_of(decisive_micro, static_search.parse(cheap, decisive_micro), x_test).softmax(-1).amax(-1)
    # about half the images go past the first rung, most of those past the second
    text = f"{cheap} -> [p<{float(p.median()):.2f}] widths=1,1,1,1 merge r=2 -> [p<0.95] widths=2,2,2,2 none"
    res = _export(capsys, decisive_checkpoint, tmp_path / "c", "--cascade", text)
    assert res["predictions_differ"] == 0 and res["escalations_differ"] == 0 and res["max_abs_diff"] < 1e-4
    assert 0 < res["escalated"] < 1 and res["top1"] == res["meta_top1"]
    folder = tmp_path / "c"
    assert {p.name for p in folder.iterdir()} >= {"cascade.json", "run_cascade.py", "rung1", "rung2", "rung3"}
    x = torch.randn(64, 1, 28, 28)
    np.save(tmp_path / "x.npy", x.numpy())
    proc = subprocess.run([sys.executable, str(folder / "run_cascade.py"), str(tmp_path / "x.npy")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    cascade = casc.parse(text, decisive_micro)
    assert cascade.describe() == text and len(cascade.rungs) == 3  # the parser inverts describe
    logits, passes = casc.forward(decisive_micro, cascade, x)
    assert got["predictions"] == logits.argmax(-1).tolist() and got["passes"] == passes.tolist()


def test_selector_exports_for_pytorch_only_with_the_reason(sweep, capsys, tmp_path):
    storage, rows = sweep
    n = next(n for n, r in rows.items() if r["method"] == "selector")
    rc, res, err = run_cli(capsys, "export", "--sweep", SWEEP, "--trial", str(n), "--storage", storage, "--output",
                           str(tmp_path / "s"), "--json")
    assert rc == 0, err
    assert res["onnx"] is None and "data" in res["why_no_onnx"]
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"selector.safetensors", "meta.safetensors", "manifest.json"}


def test_ppt_without_the_batch_split_gives_the_same_tokens():
    """The exported PPT runs both branches and picks per image; with a threshold that
    splits the batch (half pool, half prune) it equals prance.tokens.ppt on every image."""
    from prance.export.static import ppt_where
    from prance.tokens.ppt import ppt_tokens, significance
    from prance.tokens.state import TokenState

    g = torch.Generator().manual_seed(0)
    b, n, c, h = 8, 17, 12, 2
    state = TokenState(torch.randn(b, n, c, generator=g), None, 1, cls_attn=torch.rand(b, h, n, generator=g).softmax(-1),
                       metric=torch.randn(b, n, 6, generator=g), v_norm=torch.rand(b, n, generator=g) ** 4)
    var = significance(state).var(dim=-1)
    threshold = float(var.median())
    stats = {}
    ref = ppt_tokens(TokenState(**{**state.__dict__, "stats": stats}), 5, threshold)
    assert 0 < int(stats["ppt_pool"][0].sum()) < b  # a real mix of pooled and pruned images
    got = ppt_where(5, threshold, 1).apply(state)
    assert torch.equal(got.x, ref.x) and torch.equal(got.size, ref.size)


# ------------------------------------------------------------------ MLflow models of a sweep


def test_best_rows_become_registered_pyfunc_models(sweep, tmp_path):
    """Each budget x method's best row is logged as a pyfunc model in its trial run; the
    budget's best is registered; a fresh process loads models:/ and predicts the library's
    classes."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import warnings

    import numpy as np
    import pandas as pd
    from mlflow import MlflowClient

    from prance.sweep import best
    from prance.sweep.models import log_models

    storage, _ = sweep
    shutil.copytree(Path(storage) / SWEEP, tmp_path / SWEEP)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("prance-sweep-s1", artifact_location=(tmp_path / "artifacts").as_uri())
    csv = tmp_path / SWEEP / "results.csv"
    df = pd.read_csv(csv)
    df["mlflow_run_id"] = [c.create_run(exp).info.run_id for _ in range(len(df))]
    df.to_csv(csv, index=False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logged = log_models(str(tmp_path), SWEEP, uri)
    assert not [str(w.message) for w in caught if "type hint" in str(w.message).lower()]
    assert {r["method"] for r in logged} == {"training_free", "static", "cascade", "controller", "selector"}
    registered = [r for r in logged if r["registered"]]
    assert len(registered) == 1 and registered[0]["registered"] == "models:/prance-fashion-mnist-50pct/1"
    top = best(str(tmp_path), SWEEP, "50%")
    assert registered[0]["method"] == top.method and registered[0]["trial"] == top.trial_number
    run = c.get_run(df.loc[df["trial_number"] == top.trial_number, "mlflow_run_id"].iloc[0])
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["fashion-mnist-validation"]  # mlflow.log_input
    assert torch.is_grad_enabled()  # logging the models (MLflow loads them to check the example) left autograd on
    # a resumed sweep calls it again: nothing is logged or registered twice
    again = log_models(str(tmp_path), SWEEP, uri)
    assert [(r["model_uri"], r["registered"]) for r in again] == [(r["model_uri"], r["registered"]) for r in logged]
    assert [len(c.get_run(r["run_id"]).inputs.dataset_inputs) for r in again] == [1] * len(again)

    from prance.data import input_spec_for_model, preprocess

    x = preprocess(top.validation_images()[0][:16], input_spec_for_model(top.meta.vit))  # held as uint8; the model takes floats
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import json, sys, mlflow, numpy as np; mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model('models:/prance-fashion-mnist-50pct/1'); "
            "print(json.dumps(np.asarray(m.predict(np.load(sys.argv[2]))).argmax(-1).tolist()))")
    proc = subprocess.run([sys.executable, "-c", code, uri, str(tmp_path / "x.npy")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.inference_mode():
        if top.static is not None:
            ref = top.meta(x, top.static.subnet, top.static.plan)
        else:
            from prance.selector.store import load_selector

            ref = load_selector(top.selector, top.meta)[0].run_episode(top.meta, x, float(top.row["budget_gflops"])).logits
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ref.argmax(-1).tolist()

    # the cascade's model: sliced rungs + thresholds, the library cascade's logits
    import mlflow

    from prance import cascade as casc

    rec = next(r for r in logged if r["method"] == "cascade")
    row = best(str(tmp_path), SWEEP, "50%", method="cascade")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        got = mlflow.pyfunc.load_model(rec["model_uri"]).predict(x.numpy())
    finally:
        mlflow.set_tracking_uri(before)
    ref, _ = casc.forward(row.meta, row.cascade, x)
    assert np.abs(got - ref.numpy()).max() < 1e-4 and (got.argmax(-1) == ref.argmax(-1).numpy()).all()

    # the controller's model: its checkpoint and meta-network, the library controller's logits
    from prance.selector import passes

    rec = next(r for r in logged if r["method"] == "controller")
    row = best(str(tmp_path), SWEEP, "50%", method="controller")
    mlflow.set_tracking_uri(uri)
    try:
        got = mlflow.pyfunc.load_model(rec["model_uri"]).predict(x.numpy())
    finally:
        mlflow.set_tracking_uri(before)
    ref = passes.run(row.meta, row.controller, x)[0]
    assert np.abs(got - ref.numpy()).max() < 1e-4


def test_the_pyfunc_model_is_typed_so_mlflow_does_not_warn_per_model():
    """MLflow 3 warns "Add type hints to the `predict` method" each time it loads a
    PythonModel whose predict has none: once per model the sweep logs. PranceModel.predict
    takes and gives np.ndarray, a hint MLflow accepts without inferring a schema."""
    import runpy
    import warnings

    import numpy as np

    from prance.sweep.models import PYFUNC_FILE

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = runpy.run_path(str(PYFUNC_FILE))  # what mlflow.pyfunc.log_model(python_model=<file>) runs
    assert not [str(w.message) for w in caught if "type hint" in str(w.message).lower()]
    assert module["PranceModel"]().predict_type_hints.input is np.ndarray


def test_no_mlflow_progress_bars_while_the_sweep_logs_models(monkeypatch):
    """Against a tracking server MLflow draws a progress bar for each artifact download it
    makes while logging a model (it loads the model back to check its input example):
    log_models runs inside tracking.no_artifact_progress_bars, which MLflow's own bar
    honours; the setting is left as it was, and one the user made is kept."""
    import os

    from mlflow.utils.file_utils import ArtifactProgressBar

    from prance import tracking

    def drawn() -> bool:
        with ArtifactProgressBar.files(desc="Downloading artifacts", total=1) as bar:
            return bar.pbar is not None

    monkeypatch.delenv(tracking.PROGRESS_BAR_ENV, raising=False)
    assert drawn()
    with tracking.no_artifact_progress_bars():
        assert not drawn()
    assert drawn() and tracking.PROGRESS_BAR_ENV not in os.environ
    monkeypatch.setenv(tracking.PROGRESS_BAR_ENV, "true")  # the user wants them
    with tracking.no_artifact_progress_bars():
        assert drawn()


def test_sweep_experiments_are_marked_as_model_training(tmp_path):
    from mlflow import MlflowClient

    from prance import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "prance-sweep-x")
    assert MlflowClient(uri).get_experiment(exp).tags[tracking.EXPERIMENT_KIND] == "custom_model_development"


def test_compare_methods_runs_every_methods_best_row_on_the_same_test_images(sweep, tmp_path, capsys):
    """scripts/compare_methods.py: each method's best row of the budget and the dense model
    on the sweep's test images; the static row's Top-1 is evaluate()'s, and the paired
    differences are the differences of Top-1 (the same images for every row)."""
    import importlib.util
    import json

    from prance.evaluate import evaluate
    from prance.selector.train import batches
    from prance.sweep import best

    spec = importlib.util.spec_from_file_location("compare_methods", Path(__file__).resolve().parent.parent / "scripts" / "compare_methods.py")
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    storage, _ = sweep
    out = tmp_path / "compare.json"
    assert cm.main(["--sweep", SWEEP, "--storage", storage, "--limit", "300", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["budgets"]["50%"]
    assert set(rows) == {"training_free", "static", "cascade", "controller", "selector"} and record["dense"]["n_images"] == 300
    static = best(storage, SWEEP, "50%", method="static")
    x, y = static.test_images(300)
    assert rows["static"]["test_top1"] == pytest.approx(evaluate(static.meta, batches(x, y, 64), static.static.subnet,
                                                                 static.static.plan, progress=False)["top1"], abs=1e-9)
    for method in ("training_free", "cascade", "controller", "selector"):
        r = rows[method]
        assert r["vs_static"] == pytest.approx(r["test_top1"] - rows["static"]["test_top1"], abs=1e-9)
        assert r["test_gflops"] <= r["test_gflops_p95"] * (1 + 1e-9) <= r["test_gflops_max"] * (1 + 1e-9)
    assert rows["static"]["meets_cap"] and rows["static"]["test_gflops"] == pytest.approx(rows["static"]["test_gflops_max"], rel=1e-12)
    assert "| 50% | cascade |" in capsys.readouterr().out
    assert cm.main(["--sweep", "nope", "--storage", storage]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare_methods: error: no sweep 'nope'") and err.count("\n") == 1
