"""Deployable artifacts of what a sweep found (``python -m prance export``).

- a static configuration: :mod:`prance.export.static` (the sliced standalone module,
  safetensors) and :mod:`prance.export.onnx` (its ONNX graph, checked with onnxruntime);
- a cascade: both configurations' graphs, the threshold and a manifest in one folder,
  run by :mod:`prance.export.cascade_runner` (numpy + onnxruntime only, copied into the
  folder as ``run_cascade.py``);
- a selector: PyTorch only (the selector file, its meta-network and a manifest), see
  :data:`SELECTOR_REASON`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from prance.errors import PranceError

SELECTOR_REASON = (
    "A selector is exported for PyTorch only. Its decisions change shapes per image: before each stage it "
    "picks the stage's heads, MLP and embedding widths and its token keep ratio from the image's features, "
    "so the weight slices and token counts of the next blocks depend on the data, and a batch runs as "
    "groups of images with the same schedule. An ONNX graph has one fixed set of weights per op: it would "
    "need every reachable schedule as a branch (If subgraphs over all width x keep choices per stage, "
    "hundreds of sub-graphs), or padding to the widest sub-network, which gives up the speed the selector "
    "is for. A static configuration or a cascade of two (a few static graphs) is the adaptivity that "
    "survives export."
)


def file_size(path: str | Path) -> int:
    return Path(path).stat().st_size


@torch.inference_mode()
def check_static(meta, config, module, onnx_path: str | Path | None, x: torch.Tensor, y: torch.Tensor | None,
                 batch_size: int = 256, compiled_module=None) -> dict:
    """Logits of the sliced module, (when given) the ONNX graph under onnxruntime and the
    module under torch.compile against the meta-network's on the images ``x``: largest
    absolute difference, and Top-1 of each (with labels ``y``) and how many predictions differ."""
    from prance.export import onnx as ox

    def run(f) -> torch.Tensor:
        return torch.cat([f(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])

    ref = run(lambda b: meta(b, config.subnet, config.plan))
    got = {"torch": run(module)}
    if onnx_path is not None:
        got["onnxruntime"] = ox.run(ox.session(onnx_path), x, batch_size)
    if compiled_module is not None:
        got["compiled"] = run(compiled_module)
    out = {"check_images": int(x.shape[0])}
    if y is not None:
        out["meta_top1"] = 100.0 * float((ref.argmax(-1) == y).float().mean())
    for name, logits in got.items():
        out[f"{name}_max_abs_diff"] = float((logits - ref).abs().max())
        out[f"{name}_predictions_differ"] = int((logits.argmax(-1) != ref.argmax(-1)).sum())
        if y is not None:
            out[f"{name}_top1"] = 100.0 * float((logits.argmax(-1) == y).float().mean())
    return out


def export_static(meta, config, folder: str | Path, model_name: str = "", model_kwargs: dict | None = None,
                  onnx: bool = True, check: tuple | None = None, meta_file: str | Path | None = None,
                  compile: str | None = None) -> dict:
    """Write ``folder/{model.safetensors, manifest.json, model.onnx}`` for ``config`` and
    check them on ``check`` = (images, labels or None). ``compile`` (a torch.compile
    backend, e.g. ``inductor``): also check the module compiled with it
    (:func:`static.compiled`) and record in the manifest that :func:`static.load` compiles
    it so."""
    from prance.export import onnx as ox
    from prance.export import static

    folder = Path(folder)
    module = static.slice_static(meta, config, model_name, model_kwargs)
    static.save(module, folder)
    out = {"kind": "static", "configuration": config.describe(), "gflops": config.gflops, "folder": str(folder),
           "weights": str(folder / static.WEIGHTS), "weights_bytes": file_size(folder / static.WEIGHTS),
           "parameters": static.parameters(module), "meta_parameters": static.parameters(meta.vit)}
    if meta_file is not None:
        out["meta_bytes"] = file_size(meta_file)
    onnx_path = None
    if onnx:
        x0 = check[0][:2] if check is not None else x_zero(module)
        onnx_path = ox.export_onnx(module, x0, folder / ox.ONNX_FILE)
        out.update(onnx=str(onnx_path), onnx_bytes=file_size(onnx_path))
    fast = None
    if compile:
        fast, out["compile_s"] = _compiled(folder, compile, check[0][:256] if check is not None else x_zero(module))
    if check is not None:
        out.update(check_static(meta, config, static.load(folder, compile=False), onnx_path, *check, compiled_module=fast))
    if compile:
        static.set_compile(folder, compile)
        out[static.COMPILE_KEY] = compile
    return out


def x_zero(module) -> torch.Tensor:
    """Two black images of the shape ``module`` takes."""
    return torch.zeros(2, module.manifest["in_chans"], *module.img_size)


def _compiled(folder: Path, backend: str, x: torch.Tensor) -> tuple:
    """(the exported module under torch.compile with ``backend``, seconds its first call
    took: the compilation) -- PranceError in one line when it cannot be compiled."""
    import time

    from prance.errors import first_line
    from prance.export import static

    t0 = time.perf_counter()
    try:
        fast = static.compiled(static.load(folder, compile=False), backend)
        with torch.inference_mode():
            fast(x)
    except Exception as e:
        raise PranceError(f"torch.compile failed on the exported module ({type(e).__name__}: {first_line(e)}); "
                          "export without --compile") from None
    return fast, time.perf_counter() - t0


def export_cascade(meta, cascade, folder: str | Path, model_name: str = "", model_kwargs: dict | None = None,
                   check: tuple | None = None) -> dict:
    """``folder/rung1/``, ``folder/rung2/``, ... (each an exported static configuration with
    its ONNX graph), ``folder/cascade.json`` (the thresholds, descriptions, GFLOPs) and
    ``folder/run_cascade.py`` (the onnxruntime runner)."""
    from prance.export import cascade_runner

    folder = Path(folder)
    cascade = cascade.used()  # rungs behind a threshold of 0 are never reached
    rungs = []
    for i, cfg in enumerate(cascade.rungs, 1):
        export_static(meta, cfg, folder / f"rung{i}", model_name, model_kwargs, onnx=True, check=None)
        rungs.append({"graph": f"rung{i}/model.onnx", "configuration": cfg.describe(), "gflops": cfg.gflops})
    manifest = {"format": cascade_runner.FORMAT, "rungs": rungs, "thresholds": list(cascade.thresholds),
                "description": cascade.describe(),
                "rule": "run rung 1 on every image; while the answer's top-1 softmax probability is below the rung's "
                        "threshold, run the next rung too and take its logits"}
    (folder / cascade_runner.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copyfile(cascade_runner.__file__, folder / "run_cascade.py")
    out = {"kind": "cascade", "configuration": cascade.describe(), "folder": str(folder),
           "thresholds": list(cascade.thresholds), "rungs": [str(folder / f"rung{i}") for i in range(1, len(rungs) + 1)]}
    if check is not None:
        from prance import cascade as casc

        x, y = check
        ref, passes = casc.forward(meta, cascade, x)
        got, passes2 = cascade_runner.Cascade(folder).run(x.numpy())
        out.update(check_images=int(x.shape[0]), escalated=float((passes > 1).float().mean()),
                   escalations_differ=int((torch.from_numpy(passes2) != passes).sum()),
                   predictions_differ=int((torch.from_numpy(got).argmax(-1) != ref.argmax(-1)).sum()),
                   max_abs_diff=float((torch.from_numpy(got) - ref).abs().max()))
        if y is not None:
            out["top1"] = 100.0 * float((torch.from_numpy(got).argmax(-1) == y).float().mean())
            out["meta_top1"] = 100.0 * float((ref.argmax(-1) == y).float().mean())
    return out


def export_selector(selector_path: str | Path, checkpoint: str | Path, folder: str | Path) -> dict:
    """PyTorch only: the selector file and its meta-network side by side, with a manifest
    that says how to load them and why there is no ONNX graph."""
    from prance.selector.store import SELECTOR_FILE, read_selector_header

    header = read_selector_header(selector_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(selector_path, folder / SELECTOR_FILE)
    shutil.copyfile(checkpoint, folder / "meta.safetensors")
    manifest = {"format": "prance.selector_export.v1", "selector": SELECTOR_FILE, "meta_network": "meta.safetensors",
                "budget_gflops": (header.get("extra") or {}).get("budget_gflops"), "onnx": None, "why_no_onnx": SELECTOR_REASON,
                "load": "python -m prance eval --checkpoint meta.safetensors --selector selector.safetensors"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"kind": "selector", "folder": str(folder), "selector": str(folder / SELECTOR_FILE), "onnx": None,
            "why_no_onnx": SELECTOR_REASON}


CONTROLLER_REASON = ("the controller decides per image, after each pass, whether and which rung runs next: "
                     "data-dependent control flow that one ONNX graph does not express; its rungs export as static "
                     "configurations (`prance export --config`)")


def export_controller(controller_path: str | Path, checkpoint: str | Path, folder: str | Path) -> dict:
    """PyTorch only, as a selector: the controller file and its meta-network side by side."""
    from prance.selector.passes import CONTROLLER_FILE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(controller_path, folder / CONTROLLER_FILE)
    shutil.copyfile(checkpoint, folder / "meta.safetensors")
    manifest = {"format": "prance.controller_export.v1", "controller": CONTROLLER_FILE, "meta_network": "meta.safetensors",
                "onnx": None, "why_no_onnx": CONTROLLER_REASON,
                "load": "prance.selector.passes.load('controller.safetensors', prance.checkpoint.load_checkpoint('meta.safetensors')[0])"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"kind": "controller", "folder": str(folder), "controller": str(folder / CONTROLLER_FILE), "onnx": None,
            "why_no_onnx": CONTROLLER_REASON}
