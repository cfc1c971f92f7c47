"""The command-line side of running a sweep row again and exporting it: ``eval --config``,
``eval --sweep NAME --trial N | --budget B --best``, and ``export``. Kept out of
:mod:`prance.cli`, which only adds these arguments and dispatches here."""

from __future__ import annotations

import argparse
import os
import sys

from prance.errors import PranceError
from prance.selector.config import DEFAULT_CHECKPOINT


def add_row_args(p: argparse.ArgumentParser, budget: bool = False, mlflow_uri: bool = True) -> None:
    """What picks a configuration: a configuration string, or a sweep row (and
    ``--mlflow-uri`` unless the parser has it already)."""
    from prance.artifacts import add_mlflow_uri_arg

    p.add_argument("--config", dest="static_config", metavar="CONFIGURATION",
                   help="a static configuration or a cascade as the sweep prints it, e.g. 'widths=0,0,1,2 merge r=6' "
                        "or 'widths=0,0,0,0 merge r=4 -> [p<0.71] widths=3,3,3,3 none'")
    p.add_argument("--sweep", help="a sweep's name (its folder under --storage): run one of its rows")
    p.add_argument("--trial", type=int, help="with --sweep: the row of this trial number")
    p.add_argument("--best", action="store_true", help="with --sweep and --budget: the best row of that budget")
    p.add_argument("--method", choices=["selector", "cascade", "static", "training_free"], help="with --best: only rows of this method")
    p.add_argument("--storage", help="where the sweep folders are (default $PRANCE_STORAGE, else runs/sweeps)")
    if mlflow_uri:
        add_mlflow_uri_arg(p)
    if budget:
        p.add_argument("--budget", help="with --sweep --best: the budget as the sweep names it (e.g. 20%%)")


def wants_row(args: argparse.Namespace) -> bool:
    return getattr(args, "static_config", None) is not None or getattr(args, "sweep", None) is not None


def check_row_args(args: argparse.Namespace) -> None:
    """A flag that picks a sweep row without ``--sweep`` (or ``--method`` without
    ``--best``) is an error before any work: it would be ignored without a word."""
    if args.sweep is None:
        given = [f for f in ("trial", "best", "method", "storage") if getattr(args, f) not in (None, False)]
        if args.command == "export" and args.budget is not None:
            given.append("budget")
        if given:
            raise PranceError(f"--{given[0]} picks a sweep row: it needs --sweep NAME")
    elif args.method is not None and not args.best:
        raise PranceError("--method applies to --best only (a --trial row is that trial's method)")
    elif args.trial is not None and args.budget is not None:
        raise PranceError("--budget picks the row with --best; a --trial row has its own budget: drop --budget")


def _storage(args) -> str:
    return args.storage or os.environ.get("PRANCE_STORAGE") or "runs/sweeps"


def sweep_row(args: argparse.Namespace):
    """The SweepRow that ``--sweep`` with ``--trial`` or ``--budget --best`` names."""
    from prance.sweep import rows

    if args.static_config:
        raise PranceError("give either --config or --sweep, not both")
    if (args.trial is None) == (not args.best):
        raise PranceError("--sweep needs --trial N, or --budget B --best")
    if args.best:
        if args.budget is None:
            raise PranceError("--best needs --budget (the budget as the sweep names it, e.g. 20%)")
        return rows.best(_storage(args), args.sweep, args.budget, args.method)
    return rows.trial_row(_storage(args), args.sweep, args.trial)


def _checkpoint(args) -> str:
    from prance.artifacts import local_path
    from prance.checkpoint import locate

    path = args.checkpoint or DEFAULT_CHECKPOINT
    return locate(local_path(path, args.mlflow_uri, what="checkpoint"))  # a shipped one: its file, which exports copy


def config_from_args(args: argparse.Namespace, base=None):
    """(meta-network, configuration, header, SweepRow or None) of ``--config`` / ``--sweep``:
    the configuration is a StaticConfig, a Cascade or (a controller row) a passes.Controller;
    a selector row gives (None, None, None, row)."""
    from prance import cascade, static_search
    from prance.checkpoint import load_checkpoint

    if args.sweep:
        row = sweep_row(args)
        if row.selector is not None:
            return None, None, None, row
        return row.meta, row.controller or row.cascade or row.static, _header(row.checkpoint), row
    meta, header = load_checkpoint(_checkpoint(args), getattr(args, "model", None))
    parse = cascade.parse if cascade.is_cascade(args.static_config) else static_search.parse
    return meta, parse(args.static_config, meta, base), header, None


def _header(checkpoint: str) -> dict:
    from prance.checkpoint import is_timm_source, read_header

    return {} if is_timm_source(checkpoint) else read_header(checkpoint)


def _row_fields(row) -> dict:
    if row is None:
        return {}
    return {"sweep": row.sweep, "trial": row.trial_number, "method": row.method, "budget": row.row.get("budget"),
            "row_top1": row.top1, "row_gflops": row.row.get("gflops")}


def eval_row(args: argparse.Namespace, eval_selector) -> dict:
    """``eval --config`` / ``eval --sweep``: Top-1, GFLOPs, token ratios and throughput of
    the configuration on ``--split`` (``sweep``: the images the sweep scored its rows on)."""
    from prance.evaluate import evaluate
    from prance.selector.train import batches

    if args.strategy != "none" or args.r is not None or args.keep is not None or (args.budget is not None and not args.best):
        raise PranceError("--config / --sweep name the token strategy and its parameter themselves: drop --strategy/--r/--keep/--budget")
    if args.selector:
        raise PranceError("--selector and --config/--sweep: give one")
    if args.split == "sweep" and not args.sweep:
        raise PranceError("--split sweep (the sweep's validation images) needs --sweep")
    from prance.cli import _strategy_config

    from prance.cascade import Cascade
    from prance.cli import latency, skipped_images

    meta, config, _, row = config_from_args(args, _strategy_config(args, "none"))
    if row is not None and row.selector is not None:  # a selector row: eval --selector with the sweep's meta-network
        args.selector, args.checkpoint, args.budget = row.selector, row.checkpoint, None
        loader = None
        if args.split == "sweep":
            loader = list(batches(*row.validation_images(), args.batch_size))
        return {**_row_fields(row), **eval_selector(args, loader)}
    loader = _loader(args, meta, row)
    if isinstance(config, Cascade):
        result = _eval_cascade(args, meta, config, loader)
    elif row is not None and row.controller is not None:
        result = _eval_controller(args, meta, row.controller, loader)
    else:
        result = evaluate(meta, loader, config.subnet, config.plan, device=args.device, amp=args.amp, progress=True)  # stderr, also with --json
        result.update(latency(args, lambda x: meta(x, config.subnet, config.plan), loader))
        result = {"configuration": config.describe(), "strategy": config.strategy.name, "params": dict(config.plan.params), **result}
    return {**_row_fields(row), **result, **skipped_images(args, loader, result)}


def _eval_adaptive(args, loader, evaluate, forward) -> dict:
    """An adaptive configuration's ``evaluate(x, y, batch_size)`` on all of ``loader``'s
    images, plus the batch-1 latency of ``forward`` (images -> logits)."""
    import torch

    from prance.cli import latency

    xs, ys = zip(*loader)
    result = evaluate(torch.cat(xs), torch.cat(ys), args.batch_size)
    result.update(latency(args, forward, loader))
    return result


def _eval_cascade(args, meta, cascade, loader) -> dict:
    """A cascade's Top-1, per-image GFLOPs (mean, p95, max), escalation shares, img/s and batch-1 latency."""
    from prance import cascade as casc
    from prance.device import resolve

    meta.to(resolve(args.device))
    result = _eval_adaptive(args, loader, lambda x, y, b: casc.evaluate(meta, cascade, x, y, b),
                            lambda x: casc.forward(meta, cascade, x)[0])
    return {"configuration": cascade.describe(), "strategy": "cascade", "rungs": len(cascade.used().rungs), **result}


def _eval_controller(args, meta, ctl, loader) -> dict:
    """A multi-pass controller's Top-1, per-image GFLOPs, passes, img/s and batch-1 latency."""
    from prance.device import resolve
    from prance.selector import passes

    meta.to(resolve(args.device))
    result = _eval_adaptive(args, loader, lambda x, y, b: passes.evaluate(meta, ctl, x, y, b),
                            lambda x: passes.run(meta, ctl, x)[0])
    return {"configuration": ctl.describe(), "strategy": "controller", **result}


def _loader(args, meta, row):
    from prance.data import build_dataset, input_spec_for_model, make_loader, seeded_subset
    from prance.selector.train import batches

    if args.split == "sweep":
        x, y = row.validation_images()
        if args.limit is not None:
            x, y = x[: args.limit], y[: args.limit]
        return list(batches(x, y, args.batch_size))
    ds = build_dataset(args.dataset, args.split, input_spec_for_model(meta.vit), skip_bad=args.skip_bad_images)
    if args.limit is not None:
        ds = seeded_subset(ds, args.limit, args.seed)
    return make_loader(ds, batch_size=args.batch_size, num_workers=args.workers)


def _check_images(args, meta):
    """(images, labels) the export is checked on: ``--check-limit`` of the test split (0: none)."""
    import torch

    from prance.data import build_dataset, input_spec_for_model, make_loader, seeded_subset

    if args.check_limit == 0:
        return None
    ds = build_dataset(args.dataset, "test", input_spec_for_model(meta.vit))
    if args.check_limit is not None:
        ds = seeded_subset(ds, min(args.check_limit, len(ds)), 0)
    xs, ys = zip(*make_loader(ds, batch_size=1024))
    return torch.cat(xs), torch.cat(ys)


def cmd_export(args: argparse.Namespace) -> dict:
    from prance.cascade import Cascade, is_cascade
    from prance.export import export_cascade, export_controller, export_selector, export_static

    chosen = [bool(args.static_config), bool(args.sweep), bool(args.cascade), bool(args.selector)]
    if sum(chosen) != 1:
        raise PranceError("export one thing: --config, --sweep (with --trial or --budget --best), --cascade or --selector")
    if args.check_limit is not None and args.check_limit < 0:
        raise PranceError(f"--check-limit must be >= 0, got {args.check_limit}")
    say = lambda text: print(f"[export] {text}", file=sys.stderr, flush=True)  # noqa: E731 -- stderr, also with --json
    if args.compile and (args.selector or args.cascade):
        raise PranceError(_COMPILE_STATIC_ONLY)
    if args.compile:
        _check_backend(args.compile)
    if args.selector:
        from prance.artifacts import local_path
        from prance.selector.config import SelectorConfig
        from prance.selector.store import read_selector_header

        path = local_path(args.selector, args.mlflow_uri, prefer="selector.safetensors", what="selector")
        if not args.checkpoint:
            args.checkpoint = SelectorConfig.model_validate(read_selector_header(path)["config"]).checkpoint
        return export_selector(path, _checkpoint(args), args.output)
    if args.cascade:
        args.static_config = args.cascade
        if not is_cascade(args.cascade):
            raise PranceError(f"--cascade {args.cascade!r} is not '<configuration> -> [p<threshold] <configuration> ...' "
                              "(as search-cascade and the sweep print it); a static configuration goes to --config")
    meta, config, header, row = config_from_args(args)
    if args.compile and (isinstance(config, Cascade) or row is not None and (row.selector or row.controller) is not None):
        raise PranceError(_COMPILE_STATIC_ONLY)
    if row is not None and row.selector is not None:
        return {**_row_fields(row), **export_selector(row.selector, row.checkpoint, args.output)}
    if row is not None and row.controller is not None:
        return {**_row_fields(row), **export_controller(row.row["selector_path"], row.checkpoint, args.output)}
    if isinstance(config, Cascade):
        say(f"cascade {config.describe()} -> {args.output} (one ONNX export per rung: a minute or two each on a busy CPU)")
        return {**_row_fields(row), **export_cascade(meta, config, args.output, header.get("model", ""),
                                                     header.get("model_kwargs") or {}, check=_check_images(args, meta))}
    ckpt = row.checkpoint if row is not None else _checkpoint(args)
    say(f"{config.describe()} -> {args.output}" + ("" if args.no_onnx else " (the ONNX export takes about a minute on a busy CPU)")
        + (f"; torch.compile ({args.compile}) compiles on first use: minutes on a CPU" if args.compile else ""))
    out = export_static(meta, config, args.output, header.get("model", ""), header.get("model_kwargs") or {},
                        onnx=not args.no_onnx, check=_check_images(args, meta),
                        meta_file=None if str(ckpt).startswith("timm:") else ckpt, compile=args.compile)
    return {**_row_fields(row), **out}


_COMPILE_STATIC_ONLY = ("--compile applies to a static configuration (its sliced module); a cascade runs its rungs' "
                        "ONNX graphs, a selector or controller decides shapes per image: drop --compile")


def _check_backend(name: str) -> None:
    """A torch.compile backend torch knows (PranceError, before anything is written)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise PranceError(f"--compile {name!r}: not a torch.compile backend; use inductor (the default) or one of {', '.join(known)}")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="a static configuration, cascade or selector as deployable files (safetensors, ONNX)")
    add_row_args(p, budget=True)
    p.add_argument("--cascade", help="a cascade as search-cascade and the sweep print it: '<configuration> -> [p<0.87] <configuration> ...'")
    p.add_argument("--selector", help="a trained selector (.safetensors or runs:/ URI): exported for PyTorch only")
    p.add_argument("--checkpoint", help=f"the meta-network (default {DEFAULT_CHECKPOINT}; a sweep row uses the sweep's)")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--no-onnx", action="store_true", help="only the sliced PyTorch module")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="static configuration: also check the sliced module under torch.compile (backend, default "
                        "inductor) and have prance.export.static.load compile it (the manifest records the backend)")
    p.add_argument("--dataset", default="fashion-mnist", help="test images the export is checked on")
    p.add_argument("--check-limit", type=int, help="check on this many test images (default: the whole test split; 0: no check)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)
