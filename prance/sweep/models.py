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

METHODS = ("training_free", "static", "selector")
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
    else:
        shutil.copyfile(row.selector, folder / "selector.safetensors")
        shutil.copyfile(row.checkpoint, folder / "meta.safetensors")
        info = {"kind": "selector", "budget_gflops": float(row.row["budget_gflops"])}
    (folder / "prance_model.json").write_text(json.dumps({**info, "sweep": row.sweep, "trial": row.trial_number}) + "\n")
    return folder


def log_models(storage: str, name: str, uri: str, register: bool = True) -> list[dict]:
    """Log the best row of every budget x method (pyfunc) and register each budget's best.
    Returns one record per logged model (budget, method, trial, model_uri, registered)."""
    import mlflow
    import mlflow.data
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from prance.data import input_spec_for_model, preprocess

    df = sweep_rows.read_results(storage, name)
    budgets = [b for b in dict.fromkeys(df.loc[df["method"] != "dense", "budget"].dropna().astype(str))]
    out = []
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with tempfile.TemporaryDirectory(prefix="prance-models-") as tmp:
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
                    folder = _artifacts(row, Path(tmp) / f"{budget}-{method}".replace("%", "pct"))
                    x, y = row.validation_images()  # uint8, as the sweep held them; the model takes normalised floats
                    example = preprocess(x[:2], input_spec_for_model(row.meta.vit)).numpy()
                    with torch.inference_mode():
                        if row.static is not None:
                            logits = row.meta(x[:2], row.static.subnet, row.static.plan).numpy()
                        else:
                            logits = np.zeros((2, row.meta.arch.num_classes), np.float32)
                    with mlflow.start_run(run_id=run_id):
                        # the images the row was chosen and scored on, as the run's dataset input
                        mlflow.log_input(mlflow.data.from_numpy(x.numpy(), targets=y.numpy(), name=f"{row.dataset}-validation"),
                                         context="validation")
                        info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_FILE),
                                                       artifacts={"prance": str(folder)},
                                                       signature=infer_signature(example, logits), input_example=example,
                                                       pip_requirements=["prance", "torch", "timm", "safetensors"])
                    rec = {"budget": budget, "method": method, "trial": row.trial_number, "top1": row.top1,
                           "model_uri": info.model_uri, "registered": None}
                    logged.append(rec)
                    out.append(rec)
                if register and logged:
                    top = max(logged, key=lambda r: r["top1"])
                    settings = sweep_rows._settings(storage, name)
                    reg = registered_name(settings.get("config", {}).get("dataset", "fashion-mnist"), budget)
                    version = mlflow.register_model(top["model_uri"], reg)
                    top["registered"] = f"models:/{reg}/{version.version}"
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    return out
