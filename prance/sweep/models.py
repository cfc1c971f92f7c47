"""The sweep's models in MLflow: the best row of every budget x method logged as a pyfunc
model (with a signature and an input example) in that row's trial run, and the best row of
each budget registered as ``prance-<dataset>-<budget>`` (``20%`` -> ``20pct``). Called once
by the sweep driver after results.csv is written; usable on any finished sweep:

    from prance.sweep.models import log_models
    log_models("runs/sweeps", "demo", "sqlite:///.../mlflow.db")
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from prance.errors import PranceError
from prance.sweep import rows as sweep_rows

METHODS = ("training_free", "static", "cascade", "controller", "selector")
PYFUNC_FILE = Path(__file__).resolve().parent.parent / "export" / "pyfunc_model.py"


def registered_name(dataset: str, budget: str) -> str:
    data = re.sub(r"[^a-z0-9]+", "-", Path(dataset.split(":", 1)[-1]).name.lower()).strip("-") or "data"
    return f"prance-{data}-{re.sub(r'[^a-z0-9.]+', '-', str(budget).strip().lower().replace('%', 'pct')).strip('-')}"


def _artifacts(row: sweep_rows.SweepRow, folder: Path) -> Path:
    """The pyfunc model's ``prance`` folder for ``row``."""
    from prance.checkpoint import read_header
    from prance.export import static

    folder.mkdir(parents=True, exist_ok=True)
    if row.static is not None:
        header = read_header(row.checkpoint)
        static.save(static.slice_static(row.meta, row.static, header.get("model", ""), header.get("model_kwargs") or {}), folder)
        info = {"kind": "static", "configuration": row.static.describe()}
    elif row.cascade is not None:  # one sliced module per rung, and the thresholds between them
        header = read_header(row.checkpoint)
        cascade = row.cascade.used()
        for i, config in enumerate(cascade.rungs, 1):
            static.save(static.slice_static(row.meta, config, header.get("model", ""), header.get("model_kwargs") or {}),
                        folder / f"rung{i}")
        info = {"kind": "cascade", "configuration": cascade.describe(), "thresholds": list(cascade.thresholds),
                "rungs": [f"rung{i}" for i in range(1, len(cascade.rungs) + 1)]}
    elif row.controller is not None:
        from prance.selector.passes import CONTROLLER_FILE

        shutil.copyfile(row.row["selector_path"], folder / CONTROLLER_FILE)
        shutil.copyfile(row.checkpoint, folder / "meta.safetensors")
        info = {"kind": "controller", "configuration": row.controller.describe()}
    else:
        shutil.copyfile(row.selector, folder / "selector.safetensors")
        shutil.copyfile(row.checkpoint, folder / "meta.safetensors")
        info = {"kind": "selector", "budget_gflops": float(row.row["budget_gflops"])}
    (folder / "prance_model.json").write_text(json.dumps({**info, "sweep": row.sweep, "trial": row.trial_number}) + "\n")
    return folder


TAG_MODEL = "prance.model"  # on a trial run: the configuration whose pyfunc model it holds (a resumed sweep skips it)
TAG_MODEL_URI = "prance.model_uri"  # ... and that model's URI (MLflow 3: models:/m-<id>)


def _example(row: sweep_rows.SweepRow):
    """(a two-image input example, its logits) of ``row``: its first two validation images."""
    import numpy as np
    import torch

    from prance.data import input_spec_for_model, preprocess

    x, _ = row.validation_images()  # uint8, as the sweep held them; the model takes normalised floats
    example = preprocess(x[:2], input_spec_for_model(row.meta.vit)).numpy()
    with torch.inference_mode():
        if row.static is not None:
            logits = row.meta(x[:2], row.static.subnet, row.static.plan).numpy()
        elif row.cascade is not None:
            from prance import cascade as casc

            logits = casc.forward(row.meta, row.cascade, x[:2])[0].numpy()
        elif row.controller is not None:
            from prance.selector import passes

            logits = passes.run(row.meta, row.controller, x[:2])[0].numpy()
        else:  # a selector: only the shape matters for the signature
            logits = np.zeros((2, row.meta.arch.num_classes), np.float32)
    return example, logits


def _log_one(row: sweep_rows.SweepRow, run_id: str, folder: Path) -> str:
    """Log ``row`` as the pyfunc model ``model`` of its trial run (with the images it was
    chosen on as the run's input, the record the sweep gave the run: a run of an older
    sweep gets it here); returns the model URI. A run that already holds the model of this
    configuration (a resumed sweep) is not logged again."""
    import mlflow
    from mlflow.models import infer_signature

    from prance import splits, tracking
    from prance.data import input_spec_for_model

    uri = mlflow.get_tracking_uri()
    tags = tracking.client(uri).get_run(run_id).data.tags
    if tags.get(TAG_MODEL) == row.describe() and tags.get(TAG_MODEL_URI):
        return tags[TAG_MODEL_URI]
    example, logits = _example(row)
    spec = splits.SplitSpec.of_settings(row.dataset, row.checkpoint, row.selector_settings)
    tracking.log_inputs(uri, run_id, [splits.inputs(spec, input_spec_for_model(row.meta.vit), parts=("val",))["val"]])
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_FILE), artifacts={"prance": str(_artifacts(row, folder))},
                                       signature=infer_signature(example, logits), input_example=example,
                                       pip_requirements=["prance", "torch", "timm", "safetensors"])
        mlflow.set_tags({TAG_MODEL: row.describe(), TAG_MODEL_URI: info.model_uri})
    return info.model_uri


def _register(model_uri: str, run_id: str, name: str) -> str:
    """``models:/<name>/<version>`` of ``model_uri``: a new version, or the one a resumed
    sweep registered before from the same run."""
    import mlflow

    from prance import tracking

    client = tracking.client(mlflow.get_tracking_uri())
    try:
        known = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
    except Exception:  # no such registered model yet
        known = []
    version = known[0] if known else mlflow.register_model(model_uri, name)
    return f"models:/{name}/{version.version}"


def log_models(storage: str, name: str, uri: str, register: bool = True) -> list[dict]:
    """Log the best row of every budget x method (pyfunc) and register each budget's best.
    Returns one record per logged model (budget, method, trial, model_uri, registered).
    Safe to call again on the same sweep (after a resume): nothing is logged or
    registered twice."""
    import mlflow

    from prance import tracking

    df = sweep_rows.read_results(storage, name)
    budgets = list(dict.fromkeys(df.loc[df["method"] != "dense", "budget"].dropna().astype(str)))
    dataset = sweep_rows._settings(storage, name).get("config", {}).get("dataset", "fashion-mnist")
    out = []
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with tempfile.TemporaryDirectory(prefix="prance-models-") as tmp, tracking.no_artifact_progress_bars():
            for budget in budgets:
                logged = []
                for method in METHODS:
                    try:
                        row = sweep_rows.best(storage, name, budget, method)
                    except PranceError:  # no finished row of this method within the budget
                        continue
                    run_id = row.row.get("mlflow_run_id")
                    if not run_id:
                        continue
                    model_uri = _log_one(row, run_id, Path(tmp) / f"{budget}-{method}".replace("%", "pct"))
                    logged.append({"budget": budget, "method": method, "trial": row.trial_number, "top1": row.top1,
                                   "model_uri": model_uri, "registered": None, "run_id": run_id})
                if register and logged:
                    top = max(logged, key=lambda r: r["top1"])
                    top["registered"] = _register(top["model_uri"], top["run_id"], registered_name(dataset, budget))
                out.extend(logged)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    return out
