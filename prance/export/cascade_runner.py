"""Runs an exported confidence cascade with onnxruntime and numpy only (this file is
copied into every exported cascade folder as ``run_cascade.py``; it imports nothing from
prance).

    python run_cascade.py images.npy            # float32 (N, C, H, W), normalised as in training
    from run_cascade import Cascade; logits, passes = Cascade("folder").run(images)

Every image runs the first rung's graph; while an image's top-1 softmax probability is
below the rung's threshold it also runs the next rung's graph, whose logits are taken.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

FORMAT = "prance.cascade.v2"
MANIFEST = "cascade.json"


def _confidence(logits: np.ndarray) -> np.ndarray:
    """Top-1 softmax probability, computed as prance does (float32 softmax, then compared in float64)."""
    z = logits.astype(np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).max(axis=-1).astype(np.float64)


class Cascade:
    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = json.loads((folder / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{folder / MANIFEST} is not a {FORMAT} manifest")
        self.thresholds = [float(t) for t in self.manifest["thresholds"]]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.rungs = [ort.InferenceSession(str(folder / r["graph"]), opts, providers=["CPUExecutionProvider"])
                      for r in self.manifest["rungs"]]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, passes: how many rungs each image ran) for a float32 batch."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        logits = self.rungs[0].run(["logits"], {"images": images})[0]
        passes = np.ones(images.shape[0], dtype=np.int64)
        active = np.ones(images.shape[0], dtype=bool)
        for rung, t in zip(self.rungs[1:], self.thresholds):
            active = active & (_confidence(logits) < t)
            if not active.any():
                break
            logits[active] = rung.run(["logits"], {"images": images[active]})[0]
            passes[active] += 1
        return logits, passes


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python run_cascade.py images.npy")
    logits, passes = Cascade(Path(__file__).resolve().parent).run(np.load(sys.argv[1]))
    print(json.dumps({"predictions": logits.argmax(-1).tolist(), "passes": passes.tolist()}))
