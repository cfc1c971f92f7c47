"""Runs an exported confidence cascade with onnxruntime and numpy only (this file is
copied into every exported cascade folder as ``run_cascade.py``; it imports nothing from
prance).

    python run_cascade.py images.npy            # float32 (N, C, H, W), normalised as in training
    from run_cascade import Cascade; logits, escalated = Cascade("folder").run(images)

Every image runs the cheap graph; an image whose top-1 softmax probability is below the
threshold also runs the expensive graph, whose logits are taken.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

FORMAT = "prance.cascade.v1"
MANIFEST = "cascade.json"


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).max(axis=-1)


class Cascade:
    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = json.loads((folder / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{folder / MANIFEST} is not a {FORMAT} manifest")
        self.threshold = float(self.manifest["threshold"])
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.cheap = ort.InferenceSession(str(folder / self.manifest["cheap"]["graph"]), opts, providers=["CPUExecutionProvider"])
        self.expensive = ort.InferenceSession(str(folder / self.manifest["expensive"]["graph"]), opts,
                                              providers=["CPUExecutionProvider"])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, escalated mask) for a float32 batch."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        logits = self.cheap.run(["logits"], {"images": images})[0]
        up = _softmax_max(logits) < self.threshold
        if up.any():
            logits[up] = self.expensive.run(["logits"], {"images": images[up]})[0]
        return logits, up


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python run_cascade.py images.npy")
    logits, up = Cascade(Path(__file__).resolve().parent).run(np.load(sys.argv[1]))
    print(json.dumps({"predictions": logits.argmax(-1).tolist(), "escalated": up.tolist()}))
