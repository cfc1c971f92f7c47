"""The sweep's data path at ImageNet scale, on a generated JPEG folder (issue 36).

Its table is in docs/benchmarks.md, "Data path at scale". Timings need an otherwise idle machine:

    .venv/bin/python scripts/bench_data.py                      # everything, 13,192 images
    .venv/bin/python scripts/bench_data.py --parts memory node --images 2000   # memory only, smaller

Parts (``--parts``, all by default):

- ``memory``: a split part decoded for DeiT-S (3x224x224, bicubic, crop 0.875) the way a
  trial holds it (:func:`prance.splits.load_images`: uint8), bytes per image held and the
  process's extra peak RSS while loading, against float32's 0.574 MiB per image.
  Target: <= 0.16 MiB per image.
- ``node``: the node's memory (PSS summed over this process and every Ray process it
  started: shared pages counted once) with 1 and with 4 concurrent "trials" (Ray actors
  reading the validation images from the sweep's registry, :mod:`prance.sweep.shared`, and
  touching every page): with the trials started (ready), after the part is decoded into
  the object store (decoded: the decoding worker's own memory included) and after every
  trial read it (read). The images' memory is read - ready. Target: with 4 trials < 1.10 x
  with 1 (one shared copy); a float32 copy per trial, as before issue 36, would be 4 x 4.
- ``driver``: ``plan_sweep`` over the folder (val_limit 5000, train_limit 8192, as the
  ImageNet preset) in a fresh process: its extra peak RSS (VmHWM reset before planning;
  the DeiT-S checkpoint load included) and the images it decoded. Target: < 300 MiB, 0 decoded.
- ``decode``: images/s of today's float path (timm's transform per image, in the loading
  process, torch's default threads) against the uint8 path with loader workers (one torch
  thread each, one per core). Target: >= 2x on 2 cores.

Writes ``--output`` (default docs/results/bench_data_cpu.json) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
DEIT_S = "deit_small_patch16_224"
PARTS = ("memory", "node", "driver", "decode")
FLOAT_MIB = 3 * 224 * 224 * 4 / MIB


def image_spec():
    from prance.data import InputSpec

    return InputSpec(3, (224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)


def make_folder(root: Path, n: int, classes: int = 100, seed: int = 0) -> Path:
    """``root/val/c<k>/<i>.jpg``: ``n`` JPEGs of ImageNet-like sizes (about 300-500 px a side),
    smooth noise so that decoding and resizing have real work. Kept when already there."""
    import numpy as np
    from PIL import Image

    done = root / f".made-{n}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / "val" / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(300, 500, 2))
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(d / f"{i}.jpg", quality=90)
    done.write_text("")
    return root


def _status_kib(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def node_pss_mib() -> float:
    """PSS of this process and every process it started (the local Ray instance)."""
    return sum(_pss_kib(p) for p in _descendants(os.getpid())) / 1024


# ------------------------------------------------------------------------------ parts


def bench_memory(folder: Path, n: int) -> dict:
    from prance import splits

    spec = splits.SplitSpec(f"imagefolder:{folder}", "unused", val_limit=n, train_limit=1, rollouts_from="holdout")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    x, y = splits.load_images(spec, image_spec(), parts=("val",))["val"]
    peak = _status_kib("VmHWM") - before
    per_image = x.nbytes / x.shape[0] / MIB
    return {"images": int(x.shape[0]), "held_mib_per_image": per_image, "float32_mib_per_image": FLOAT_MIB,
            "extra_peak_rss_mib_per_image": peak / 1024 / x.shape[0], "target_mib_per_image": 0.16,
            "meets_target": per_image <= 0.16}


def bench_node(folder: Path, n: int, trials: tuple[int, ...] = (1, 4)) -> dict:
    import ray

    from prance import splits
    from prance.sweep import shared

    spec = splits.SplitSpec(f"imagefolder:{folder}", "unused", val_limit=n, train_limit=1, rollouts_from="holdout")
    out = {"images": n}
    for k in trials:
        ray.init(num_cpus=max(trials), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        try:
            _registry, name = shared.start()

            @ray.remote(num_cpus=1)
            class Trial:
                def ready(self) -> int:
                    import torch  # noqa: F401 -- what a trial has imported before its images

                    import prance.sweep.shared  # noqa: F401
                    return os.getpid()

                def load(self, name, spec, image_spec) -> int:
                    from prance.sweep import shared as registry

                    self.x, self.y = registry.images(name, spec, image_spec, "val")
                    return int(self.x.sum())  # every page touched

            actors = [Trial.remote() for _ in range(k)]
            ray.get([a.ready.remote() for a in actors])
            time.sleep(2)
            ready = node_pss_mib()  # the trials' processes, no images
            ray.wait([shared.image_ref(name, spec, image_spec(), "val")], fetch_local=False)
            time.sleep(2)
            decoded = node_pss_mib()  # + the decoded part in the object store (+ the decoding worker)
            sums = ray.get([a.load.remote(name, spec, image_spec()) for a in actors])
            time.sleep(2)
            read = node_pss_mib()  # every trial holds the images and has read every page
            assert len(set(sums)) == 1
            out[f"trials_{k}"] = {"node_pss_ready_mib": ready, "node_pss_decoded_mib": decoded, "node_pss_read_mib": read,
                                  "images_pss_mib": read - ready, "reading_pss_mib": read - decoded}
        finally:
            ray.shutdown()
    one, many = out[f"trials_{trials[0]}"]["images_pss_mib"], out[f"trials_{trials[-1]}"]["images_pss_mib"]
    out.update({"uint8_copy_mib": n * 3 * 224 * 224 / MIB, "float32_copy_per_trial_mib": n * FLOAT_MIB,
                "images_ratio": many / one, "target_ratio": 1.10, "meets_target": many / one < 1.10})
    return out


DRIVER_CODE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from prance.data import DECODED
from prance.sweep.config import SweepConfig
from prance.sweep.plan import plan_sweep
import prance.checkpoint, prance.splits, timm, torch  # imports before the measurement
cfg = SweepConfig(checkpoint=sys.argv[2], dataset="imagefolder:" + sys.argv[3], budgets=["50%", "65%", "80%"],
                  strategies=["merge", "free_merge", "static_merge"], selector={"val_limit": int(sys.argv[4]),
                  "train_limit": int(sys.argv[5]), "rollouts_from": "holdout"})
status = lambda f: next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(f + ":"))
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
plan = plan_sweep(cfg)
print(json.dumps({"extra_peak_rss_mib": (status("VmHWM") - before) / 1024, "decoded": DECODED["images"],
                  "trials": len(plan.schedule)}))
"""


def bench_driver(folder: Path, n: int) -> dict:
    from prance.checkpoint import save_checkpoint
    from prance.models import create_meta

    val = min(5000, n // 2)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        ckpt = save_checkpoint(Path(tmp) / "deit_s.safetensors", create_meta(DEIT_S), DEIT_S)
        proc = subprocess.run([sys.executable, "-c", DRIVER_CODE, str(ROOT), str(ckpt), str(folder), str(val), str(n - val)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_data.py: error: planning failed: {proc.stderr.strip().splitlines()[-1:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"images": n, "val_limit": val, "train_limit": n - val, **got, "target_mib": 300,
            "meets_target": got["extra_peak_rss_mib"] < 300 and got["decoded"] == 0}


def bench_decode(folder: Path, n: int, workers: int) -> dict:
    import torch

    from prance.data import held_images, image_folder, make_loader

    spec = image_spec()
    sub = list(range(n))
    floats = torch.utils.data.Subset(image_folder(folder, "val", spec), sub)
    t = time.perf_counter()
    for _ in make_loader(floats, batch_size=64):  # before issue 36: in the trial's process, default threads
        pass
    before_s = time.perf_counter() - t
    t = time.perf_counter()
    held_images(image_folder(folder, "val", spec, uint8=True), sub, workers=workers)
    after_s = time.perf_counter() - t
    return {"images": n, "torch_threads": torch.get_num_threads(), "loader_workers": workers, "cores": os.cpu_count(),
            "float_in_process_img_s": n / before_s, "uint8_workers_img_s": n / after_s, "speedup": before_s / after_s,
            "target_speedup": 2.0, "meets_target": before_s / after_s >= 2.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=13192, help="images in the generated folder (the ImageNet preset's 5,000 + 8,192)")
    ap.add_argument("--folder", type=Path, help="where the JPEG folder is made (kept; default: a temporary one)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--node-images", type=int, default=5000, help="validation images the node part shares (default 5000)")
    ap.add_argument("--decode-images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader workers of the decode part")
    ap.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "bench_data_cpu.json")
    args = ap.parse_args()
    if args.images < 2 or min(args.node_images, args.decode_images) < 1 or args.workers < 0:
        raise SystemExit("bench_data.py: error: --images must be >= 2, --node-images and --decode-images >= 1, --workers >= 0")

    with tempfile.TemporaryDirectory(prefix="bench-data-images-") as tmp:
        folder = make_folder(args.folder or Path(tmp), args.images)
        record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "date": datetime.date.today().isoformat(),
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "folder_images": args.images}
        if "memory" in args.parts:
            record["memory"] = bench_memory(folder, min(args.node_images, args.images))
        if "node" in args.parts:
            record["node"] = bench_node(folder, min(args.node_images, args.images))
        if "driver" in args.parts:
            record["driver"] = bench_driver(folder, args.images)
        if "decode" in args.parts:
            record["decode"] = bench_decode(folder, min(args.decode_images, args.images), args.workers)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
