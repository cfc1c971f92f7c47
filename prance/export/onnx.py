"""ONNX graphs of exported static modules (``torch.onnx.export``, the torch.export-based
exporter) with a dynamic batch dimension, and their check with onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from prance.errors import PranceError, first_line

ONNX_FILE = "model.onnx"
OPSET = 18


def export_onnx(module: nn.Module, example: Tensor, path: str | Path) -> Path:
    """``module`` as an ONNX graph at ``path``: input ``images`` (batch dynamic), output ``logits``."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise PranceError("ONNX export needs onnx and onnxscript: pip install 'prance[export]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module.eval(), (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                        dynamic_shapes={"images": {0: batch}}, opset_version=OPSET, verbose=False)
        except Exception as e:
            raise PranceError(f"ONNX export failed: {first_line(e)}") from None
    program.save(str(path))
    return path


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of the graph at ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess, images: Tensor, batch_size: int = 256) -> Tensor:
    """Logits of an onnxruntime session on ``images``, batch by batch."""
    out = [sess.run(["logits"], {"images": images[i : i + batch_size].numpy().astype(np.float32)})[0]
           for i in range(0, images.shape[0], batch_size)]
    return torch.from_numpy(np.concatenate(out))
