"""Pretrain the weight-sharing meta-network with Ray Train.

    python sweeps/pretrain.py --preset default
    python sweeps/pretrain.py --preset smoke --num-workers 2
    python sweeps/pretrain.py --config my.yaml --set epochs=3 --set lr=5e-4
    python sweeps/pretrain.py --preset default --resume        # continue an interrupted run
    python sweeps/pretrain.py --preset default --export-only --export-resume checkpoints/resume/default
    python sweeps/pretrain.py --preset default --name default2 --resume-from checkpoints/resume/default
    ray job submit --working-dir . -- python sweeps/pretrain.py --preset default

A thin entry point: the YAML preset plus overrides become a PretrainConfig, and
prance.train.launch.pretrain does the rest. Input mistakes: one line, exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from prance.config import load_config, parse_overrides, presets  # noqa: E402
from prance.train.config import PretrainConfig  # noqa: E402
from prance.cli import OneLineParser  # noqa: E402
from prance.errors import PranceError  # noqa: E402


def _export_resume(cfg, dest: Path) -> None:
    from prance.storage import is_remote, local_path
    from prance.train.launch import checkpoints_in, latest_good
    from prance.train.worker import export_resume

    if is_remote(cfg.storage):
        raise PranceError("--export-resume reads a local --storage folder (copy the run's newest checkpoint_* folder first)")
    run_dir = local_path(cfg.storage) / cfg.name
    found = checkpoints_in(run_dir)
    if not found:
        raise PranceError(f"--export-resume: no checkpoint in {run_dir}")
    source = latest_good(found)
    export_resume(source, dest)
    print(f"[pretrain] resumable state of {source.name} in {dest}: continue with --resume-from {dest}")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(error_prefix="pretrain", description="Pretrain the prance meta-network (sandwich rule, in-place distillation) on Ray Train.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="default", help=f"one of: {', '.join(presets('pretrain'))}")
    src.add_argument("--config", help="a YAML file with PretrainConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (DDP)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, NCCL, AMP")
    p.add_argument("--epochs", type=int)
    p.add_argument("--storage", help="where runs and checkpoints go (local path, s3://, gs://, NFS; default $PRANCE_STORAGE, else the config's)")
    p.add_argument("--name", help="run name (a folder under --storage)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default $PRANCE_MLFLOW_URI, else sqlite:///<storage>/mlflow.db)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--resume-from", metavar="DIR", help="start this run from a saved state (what --export-resume wrote, or a checkpoint folder)")
    p.add_argument("--export", metavar="PATH", help="afterwards, export the best checkpoint (float16 if lossless) + a JSON record")
    p.add_argument("--export-resume", metavar="DIR",
                   help="afterwards, copy the run's latest checkpoint as a resumable state (safetensors only, fit for git) to DIR")
    p.add_argument("--export-only", action="store_true", help="export (--export and/or --export-resume) without training")
    args = p.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        # A cluster's runtime_env env_vars set these (docs/cluster.md); --storage / --set storage=... win.
        for key, env in (("storage", "PRANCE_STORAGE"), ("mlflow_uri", "PRANCE_MLFLOW_URI")):
            if getattr(args, key) is None and key not in overrides and os.environ.get(env):
                overrides[key] = os.environ[env]
        for key in ("num_workers", "use_gpu", "epochs", "storage", "name", "mlflow_uri"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        cfg = load_config(PretrainConfig, "pretrain", args.config or args.preset, overrides, set_keys=parse_overrides(args.set))
        if args.export_only and not (args.export or args.export_resume):
            raise PranceError("--export-only needs --export PATH or --export-resume DIR")
        if cfg.num_workers < 1 and not args.export_only:  # 0 runs the loop in-process: for unit tests, reports no checkpoint
            raise PranceError(f"--num-workers must be at least 1, got {cfg.num_workers}")
        from prance.paths import check_output_dir, check_output_file
        from prance.storage import is_remote

        if not is_remote(cfg.storage) and not args.export_only:
            check_output_dir(cfg.storage, "--storage")
        if args.export:
            check_output_file(args.export, "--export")
        if args.export_resume:
            check_output_dir(args.export_resume, "--export-resume")
        if cfg.use_gpu and not args.export_only:
            from prance.rayinit import starts_local_cluster

            if starts_local_cluster(None):  # a Ray this script starts has this machine's GPUs: count them before it starts
                import torch

                if torch.cuda.device_count() < max(1, cfg.num_workers):
                    raise PranceError(f"--use-gpu: {max(1, cfg.num_workers)} GPU worker(s) requested, this machine has {torch.cuda.device_count()} GPUs")
        from prance.train.export import export_run
        from prance.train.launch import mlflow_uri_of, pretrain, run_dir_of

        command = "python sweeps/pretrain.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--export-only")
        if args.export_only:
            if args.export_resume:
                _export_resume(cfg, Path(args.export_resume))
            if args.export:
                record = export_run(run_dir_of(cfg), Path(args.export), command, cfg.dataset, mlflow_uri=mlflow_uri_of(cfg))
                print(f"[pretrain] exported {args.export} ({record['dtype']}): {record['test_top1']}")
            return 0
        result = pretrain(cfg, resume=args.resume, resume_from=args.resume_from)
        if args.export_resume:
            _export_resume(cfg, Path(args.export_resume))
        if args.export:
            record = export_run(result.run_dir, Path(args.export), command, cfg.dataset, mlflow_uri=result.mlflow_uri)
            print(f"[pretrain] exported {args.export} ({record['dtype']}): {record['test_top1']}")
    except PranceError as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    m = result.metrics
    print(
        f"[pretrain] done: best epoch {int(m.get('epoch', -1)) + 1}: top1 largest {m.get('top1_largest', 0):.2f}%, "
        f"smallest {m.get('top1_smallest', 0):.2f}%\n"
        f"[pretrain] checkpoint: {result.checkpoint}\n"
        f"[pretrain] MLflow run {result.mlflow_run_id}: mlflow ui --backend-store-uri {result.mlflow_uri}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
