"""Sweep budget x token strategy x the selector's PPO/reward hyper-parameters with Ray Tune
+ Optuna, tracked in MLflow; report the best configuration per budget and the Pareto front.

    python sweeps/budget_sweep.py                                   # the default sweep (2 CPU cores: <= 10 min)
    python sweeps/budget_sweep.py --preset tiny --set budgets=[50%,70%]
    python sweeps/budget_sweep.py --config my.yaml --set selector.iterations=60 --name long
    python sweeps/budget_sweep.py --resume                          # continue the latest interrupted sweep
    python sweeps/budget_sweep.py --multi-objective                 # Optuna on (Top-1, GFLOPs): the Pareto front
    ray job submit --working-dir . -- python sweeps/budget_sweep.py --storage s3://bucket/sweeps

A thin entry point: the YAML preset plus overrides become a SweepConfig, and
prance.sweep.tune.run_sweep does the rest. Input mistakes: one line, exit code 2, before
any trial starts and before anything is written to MLflow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from prance.cli import OneLineParser  # noqa: E402
from prance.config import load_config, parse_overrides, presets  # noqa: E402
from prance.sweep.config import SweepConfig  # noqa: E402
from prance.errors import PranceError  # noqa: E402

ENV = {"storage": "PRANCE_STORAGE", "mlflow_uri": "PRANCE_MLFLOW_URI"}


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(error_prefix="budget_sweep", description="Ray Tune + Optuna sweep of budget x token strategy x PPO/reward hyper-parameters, tracked in MLflow.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"one of: {', '.join(presets('sweep'))} (default: default)")
    src.add_argument("--config", help="a YAML file with SweepConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, nested ones dotted (selector.iterations=20, space.clip.high=0.3); repeatable")
    p.add_argument("--storage", help="sweep folders go here: local path, s3://, gs://, NFS (default $PRANCE_STORAGE, else runs/sweeps)")
    p.add_argument("--name", help="the sweep's folder name under --storage (default <preset>-<date>-<time>)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default $PRANCE_MLFLOW_URI, else sqlite:///<storage>/mlflow.db)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (--name, default the latest in --storage)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="a GPU per trial (gpus_per_trial to share one)")
    p.add_argument("--multi-objective", action="store_true", default=None, help="Optuna on (Top-1 max, GFLOPs min), no ASHA: the Pareto front")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, e.g. under `ray job submit`; else a local Ray)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        from prance.sweep.tune import mlflow_ui_command, resume_settings, run_sweep

        storage = args.storage or os.environ.get(ENV["storage"]) or None
        mlflow_uri = args.mlflow_uri or os.environ.get(ENV["mlflow_uri"]) or None
        settings = None
        if args.resume:
            if args.preset or args.config or args.set or args.use_gpu or args.multi_objective:
                raise PranceError("--resume continues a sweep with its saved settings: drop --preset/--config/--set/--use-gpu/--multi-objective")
            cfg, settings = resume_settings(storage or SweepConfig().storage, args.name)
            if mlflow_uri and mlflow_uri != settings["mlflow_uri"]:
                cfg = cfg.model_copy(update={"mlflow_uri": mlflow_uri})
            source = settings.get("source", "")
        else:
            overrides = parse_overrides(args.set)
            for key, env in ENV.items():  # a cluster's runtime_env sets these; --storage / --set win
                if key not in overrides and os.environ.get(env):
                    overrides[key] = os.environ[env]
            for key in ("storage", "name", "mlflow_uri", "use_gpu", "multi_objective"):
                if getattr(args, key) is not None:
                    overrides[key] = getattr(args, key)
            source = args.config or args.preset or "default"
            cfg = load_config(SweepConfig, "sweep", source, overrides, set_keys=parse_overrides(args.set))
        command = "python sweeps/budget_sweep.py " + " ".join(argv)
        out = run_sweep(cfg, source=source, resume=args.resume, settings=settings, command=command.strip(), address=args.address)
    except PranceError as e:
        print(f"budget_sweep: error: {e}", file=sys.stderr)
        return 2
    print(f"\nBest configuration per budget x strategy ({out.name}; Top-1 on the validation images):\n{out.table}\n")
    print(f"results: {out.results}")
    if out.failed:
        print(f"{out.failed} trial(s) failed: their errors are in results.csv and the trial folders under {out.folder}")
    if out.interrupted:
        print(f"interrupted: {out.interrupted} trial(s) unfinished; continue with: python sweeps/budget_sweep.py --resume --name {out.name}"
              + (f" --storage {args.storage}" if args.storage else ""))
    if out.tracking_error:
        print(f"budget_sweep: MLflow is behind: {out.tracking_error}. results.csv has every trial; once MLflow answers, "
              f"python sweeps/budget_sweep.py --resume --name {out.name}" + (f" --storage {args.storage}" if args.storage else "")
              + " writes the missing runs", file=sys.stderr)
    print(f"done in {out.wall_s / 60:.1f} min. Pareto plot: {out.plot}")
    print(f"MLflow UI: {mlflow_ui_command(out.mlflow_uri, out.experiment_id)}")
    return 130 if out.interrupted else (1 if out.failed else (3 if out.tracking_error else 0))


if __name__ == "__main__":
    sys.exit(main())
