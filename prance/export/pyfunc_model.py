"""The MLflow pyfunc model of a sweep's best configuration, logged as *model from code*
(``mlflow.pyfunc.log_model(python_model=<this file>)``): MLflow stores this file, not a
pickle, and loads the weights from the model's ``prance`` artifact folder (safetensors +
JSON). Loading needs prance installed.

``predict(images)``: float32 images (N, C, H, W), normalised as in training -> logits (N, classes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class PranceModel(PythonModel):
    def load_context(self, context):
        folder = Path(context.artifacts["prance"])
        info = json.loads((folder / "prance_model.json").read_text())
        self.kind = info["kind"]
        if self.kind == "static":
            from prance.export import static

            self.module = static.load(folder)
        elif self.kind == "cascade":  # sliced modules, run while the answer is unsure (prance.cascade.chain)
            from prance.export import static

            self.rungs = [static.load(folder / name) for name in info["rungs"]]
            self.thresholds = [float(t) for t in info["thresholds"]]
        elif self.kind == "controller":  # a multi-pass controller with its meta-network
            from prance.checkpoint import load_checkpoint
            from prance.selector import passes

            self.meta, _ = load_checkpoint(folder / "meta.safetensors")
            self.controller = passes.load(folder / passes.CONTROLLER_FILE, self.meta)
        else:  # a selector with its meta-network
            from prance.checkpoint import load_checkpoint
            from prance.selector.store import load_selector

            self.meta, _ = load_checkpoint(folder / "meta.safetensors")
            self.selector, _ = load_selector(folder / "selector.safetensors", self.meta)
            self.budget = float(info["budget_gflops"])
        # no torch.set_grad_enabled(False) here: MLflow loads the model in the logging
        # process to check its input example, and that would switch autograd off there
        # for good; predict runs under inference_mode instead

    # np.ndarray: a type hint MLflow 3 accepts without inferring a schema from it (the logged
    # signature, a (-1, C, H, W) float32 tensor, describes the input); without a hint MLflow
    # warns "Add type hints to the `predict` method" every time this file is loaded
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(np.asarray(model_input, dtype=np.float32)))
        with torch.inference_mode():
            if self.kind == "static":
                logits = self.module(x)
            elif self.kind == "cascade":
                from prance.cascade import chain

                logits = chain(self.rungs, self.thresholds, x)[0]
            elif self.kind == "controller":
                from prance.selector.passes import run

                logits = run(self.meta, self.controller, x)[0]
            else:
                logits = self.selector.run_episode(self.meta, x, self.budget).logits
        return logits.float().numpy()


mlflow.models.set_model(PranceModel())
