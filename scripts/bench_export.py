"""Speed of an exported static configuration (docs/benchmarks.md, "Exported static
configuration"): the meta-network running it by slicing (what ``eval`` does), the sliced
standalone module in eager PyTorch, the same under ``torch.compile`` (as ``prance export
--compile`` offers it: :func:`prance.export.static.compiled`), and its ONNX graph
under onnxruntime -- img/s at batch 256 and batch-1 latency (median, p95 ms), on real
Fashion-MNIST test images, all at the same torch / onnxruntime thread count.

    .venv/bin/python scripts/bench_export.py [--config "widths=0,0,1,0 merge r=4"] \\
        [--checkpoint checkpoints/prance_vit_fmnist_supernet.safetensors] [--threads 2] \\
        [--output docs/results/bench_export_cpu.json]

Rounds are interleaved (one timed batch of every runner per round), so drifting machine
load hits all of them alike; the load average is recorded before and after. Writes the
JSON record and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prance import static_search  # noqa: E402
from prance.checkpoint import load_checkpoint  # noqa: E402
from prance.data import build_dataset, input_spec_for_model, make_loader, seeded_subset  # noqa: E402
from prance.evaluate import latency_b1  # noqa: E402
from prance.export import onnx as ox  # noqa: E402
from prance.export import static  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/prance_vit_fmnist_supernet.safetensors")
    ap.add_argument("--config", default="widths=0,0,1,0 merge r=4", help="the best static configuration at 20%% (search-static)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="timed batches per runner")
    ap.add_argument("--latency-runs", type=int, default=100, help="timed single images per runner")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (as `prance export --compile BACKEND`)")
    ap.add_argument("--output", default=str(ROOT / "docs" / "results" / "bench_export_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    meta, header = load_checkpoint(args.checkpoint)
    config = static_search.parse(args.config, meta)
    module = static.slice_static(meta, config, header.get("model", ""), header.get("model_kwargs") or {})
    ds = build_dataset("fashion-mnist", "test", input_spec_for_model(meta.vit))
    x, y = next(iter(make_loader(seeded_subset(ds, args.batch_size, 0), batch_size=args.batch_size)))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = ox.export_onnx(module, x[:2], Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - t0
        sess = ox.session(path, threads=args.threads)
        onnx_bytes = path.stat().st_size

        runners = {
            "meta-network (slicing, eager)": lambda b: meta(b, config.subnet, config.plan),
            "sliced module (eager)": module,
            "onnxruntime": lambda b: ox.run(sess, b, b.shape[0]),
        }
        compile_s = None
        if not args.no_compile:
            compiled = static.compiled(module, args.compile_backend)  # what `export --compile` offers: static.load compiles so
            t0 = time.perf_counter()
            with torch.inference_mode():
                compiled(x)
                compiled(x[:1])
            compile_s = time.perf_counter() - t0
            runners["sliced module (torch.compile)"] = compiled

        with torch.inference_mode():
            ref = meta(x, config.subnet, config.plan)
            agree = {name: int((f(x).argmax(-1) == ref.argmax(-1)).sum()) for name, f in runners.items()}
            diff = {name: float((f(x) - ref).abs().max()) for name, f in runners.items()}
            batch_s = {name: [] for name in runners}
            for f in runners.values():  # warm-up
                f(x)
                f(x[:1])
            for _ in range(args.rounds):
                for name, f in runners.items():
                    t0 = time.perf_counter()
                    f(x)
                    batch_s[name].append(time.perf_counter() - t0)
        latency = latency_b1(runners, x, args.latency_runs)

    rows = []
    for name in runners:
        rows.append({"runner": name, "img_s": args.batch_size / statistics.median(batch_s[name]),
                     "latency_median_ms": latency[name]["latency_b1_median_ms"], "latency_p95_ms": latency[name]["latency_b1_p95_ms"],
                     "max_abs_diff_vs_meta": diff[name], "same_predictions": agree[name]})
    eager = rows[1]["img_s"]
    for r in rows:
        r["speedup_vs_sliced_eager"] = r["img_s"] / eager
    record = {
        "command": "python scripts/bench_export.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "checkpoint": args.checkpoint, "configuration": config.describe(), "gflops": config.gflops,
        "batch_size": args.batch_size, "rounds": args.rounds, "latency_runs": args.latency_runs,
        "onnx_export_s": export_s, "compile_s": compile_s, "compile_backend": None if args.no_compile else args.compile_backend,
        "onnx_bytes": onnx_bytes,
        "sliced_params": static.parameters(module), "meta_params": static.parameters(meta.vit),
        "rows": rows,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{config.describe()}  ({config.gflops:.4g} GFLOPs)  threads {args.threads}  load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'runner':<32} {'img/s@' + str(args.batch_size):>10} {'b1 med ms':>10} {'b1 p95 ms':>10} {'vs eager':>8}")
    for r in rows:
        print(f"{r['runner']:<32} {r['img_s']:>10.0f} {r['latency_median_ms']:>10.2f} {r['latency_p95_ms']:>10.2f} "
              f"{r['speedup_vs_sliced_eager']:>8.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
