"""``python -m prance``: flops, eval and bench from the command line.

Every subcommand takes ``--json`` to print exactly one JSON value on stdout (progress and
logs go to stderr). A mistake in the input prints one line ``prance: error: ...`` and
exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from prance.artifacts import add_mlflow_uri_arg
from prance.errors import PranceError, one_line
from prance.halving import Halving
from prance.tokens.strategies import REDUCING_STRATEGIES, STRATEGIES

HELP_MODEL = "timm model name (e.g. deit_small_patch16_224, prance_vit_fmnist)"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line ``<error_prefix>: error: ...``, exit code 2."""

    def __init__(self, *args, error_prefix: str = "prance", **kwargs):
        super().__init__(*args, **kwargs)
        self.error_prefix = error_prefix

    def error(self, message: str):
        self.exit(2, f"{self.error_prefix}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, and an option given an empty value (``--config ""``, an unset
        shell variable) is an error: it would otherwise read as not given at all."""
        ns, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(ns, action.dest, None) if action.option_strings else None
            values = value if isinstance(value, list) else [value]
            if value is not action.default and any(isinstance(v, str) and not v.strip() for v in values):
                self.error(f"{action.option_strings[-1]} was given an empty value")
        return ns, extras


def _add_model_args(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    p.add_argument("--model", help=HELP_MODEL + "; default prance_vit_fmnist with its shipped checkpoint")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs internet)")
    if checkpoint:
        p.add_argument("--checkpoint", help="a prance .safetensors checkpoint, a .pt/.pth state dict with --model, or an MLflow "
                                            "runs:/ or models:/ URI, or timm:NAME (default: the model's shipped weights where prance ships some, "
                                            "timm:prance_vit_fmnist.base for the default model)")
        p.add_argument("--random-init", action="store_true", help="a randomly initialised model even where a checkpoint is shipped")
        add_mlflow_uri_arg(p)


def _add_strategy_args(p: argparse.ArgumentParser, single: bool = True) -> None:
    if single:
        p.add_argument("--strategy", default="none", help=f"token strategy: {', '.join(STRATEGIES)}")
        group = p.add_mutually_exclusive_group()
        group.add_argument("--r", type=int, help="tokens merged/removed per step (merge, ppt)")
        group.add_argument("--keep", type=float, help="keep ratio per reduction block (prune, prune_merge)")
        group.add_argument("--budget", help="target GFLOPs (e.g. 2.3) or share of dense (e.g. 50%%): calibrates r/keep")
    p.add_argument("--locs", help="prune, prune_merge, ppt: reduction blocks, comma-separated (default: quarter points, 3,6,9 for 12 blocks)")
    p.add_argument("--schedule", choices=["constant", "decreasing"], help="merge: ToMe's r schedule (default constant)")
    p.add_argument("--threshold", type=float, help="ppt: variance threshold (default 7e-5)")
    p.add_argument("--fuse", action="store_true", default=None, help="prune: fuse dropped tokens into one (EViT)")
    p.add_argument("--no-prop-attn", action="store_true", default=None, help="turn off proportional attention for merged tokens")


# The strategies each strategy flag acts on: given to a command none of whose strategies
# uses it, the flag is an error (it would be ignored without a word).
FLAG_STRATEGIES = {
    "locs": ("prune", "prune_merge", "ppt"),
    "schedule": ("merge",),
    "threshold": ("ppt",),
    "fuse": ("prune",),
    "no_prop_attn": REDUCING_STRATEGIES,
}


def strategy_list(text: str, flag: str = "--strategies") -> list[str]:
    """The token strategies of a comma-separated flag; PranceError for an unknown one, an
    empty list or one listed twice (it would run twice)."""
    from prance.tokens.strategies import check_strategy

    names = [check_strategy(s.strip()) for s in text.split(",") if s.strip()]
    if not names:
        raise PranceError(f"{flag} names no strategy")
    if len(set(names)) != len(names):
        raise PranceError(f"{flag} lists a strategy twice: {text}")
    return names


def _check_strategy_flags(args: argparse.Namespace, names: list[str]) -> None:
    for flag, applies in FLAG_STRATEGIES.items():
        if getattr(args, flag, None) is not None and not set(names) & set(applies):
            chosen = ", ".join(names) or "none"
            raise PranceError(f"--{flag.replace('_', '-')} applies to strategy {' or '.join(applies)} only, "
                              f"not to {chosen}: drop it or choose such a strategy")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    """What ``search-static`` and ``search-cascade`` share: the meta-network, the
    selector's image split, the successive halving of the static searches."""
    p.add_argument("--checkpoint", help="the meta-network (default: the shipped supernet, timm:prance_vit_fmnist)")
    p.add_argument("--first-images", type=int, default=Halving.first_images, help="successive halving: images every candidate is scored on first")
    p.add_argument("--eta", type=int, default=Halving.eta, help="successive halving: keep the best 1/eta each round")
    p.add_argument("--dataset", help="fashion-mnist or imagefolder:PATH")
    p.add_argument("--val-limit", type=int,
                   help="validation images the choice is made on (default: the default sweep's, so that the same defaults give its static rows)")
    p.add_argument("--train-limit", type=int, help="the selector's rollout images, skipped here (default: the default sweep's)")
    p.add_argument("--test-limit", type=int, default=5000, help="held-out test images the result is reported on")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true")


def _strategy_config(args: argparse.Namespace, name: str | None = None):
    from prance.tokens.strategies import StrategyConfig, check_strategy

    locs = None
    if args.locs:
        try:
            locs = tuple(int(v) for v in args.locs.split(","))
        except ValueError:
            raise PranceError(f"--locs must be comma-separated block indices, got {args.locs!r}") from None
    return StrategyConfig(
        name=check_strategy(name or args.strategy),
        r=getattr(args, "r", None),
        keep=getattr(args, "keep", None),
        locs=locs,
        schedule=args.schedule or "constant",
        threshold=7e-5 if args.threshold is None else args.threshold,
        fuse=bool(args.fuse),
        prop_attn=not args.no_prop_attn,
    )


CLI_WEIGHTS_TAG = "base"  # flops / eval / bench default to <model>.base where it is shipped (README's numbers)


def shipped_checkpoint(model_name: str):
    """The file of ``<model>.base`` (or of the tag ``--model`` names) where prance ships it,
    found by name through the model's pretrained_cfg (in a checkout or an installed wheel);
    else None."""
    import timm

    from prance.models.zoo import shipped_checkpoint as shipped

    name = model_name if "." in model_name else f"{model_name}.{CLI_WEIGHTS_TAG}"
    return shipped(name) if name in timm.list_pretrained(name.split(".")[0] + ".*") else None


def _load_model(args: argparse.Namespace):
    """The model of ``--checkpoint``; else the shipped checkpoint of ``--model`` (default
    prance_vit_fmnist) when there is one; else timm's model, randomly initialised unless
    ``--pretrained`` (``args.random_weights`` is set then: main warns after the result)."""
    from prance.models import DEFAULT_MODEL, create_meta

    checkpoint = getattr(args, "checkpoint", None)
    name = args.model or DEFAULT_MODEL
    if getattr(args, "random_init", False):
        if checkpoint or args.pretrained:
            raise PranceError("--random-init cannot be combined with --checkpoint or --pretrained")
    elif not checkpoint and not args.pretrained:
        checkpoint = shipped_checkpoint(name)
    if checkpoint:
        from prance.artifacts import local_path
        from prance.checkpoint import load_checkpoint

        checkpoint = local_path(checkpoint, getattr(args, "mlflow_uri", None), what="checkpoint")  # runs:/, models:/
        args.checkpoint = str(checkpoint)
        model, _ = load_checkpoint(checkpoint, args.model)
        return model
    args.random_weights = name if not args.pretrained else None
    return create_meta(name, pretrained=args.pretrained)


def _budget(args: argparse.Namespace, model) -> float | None:
    from prance.budget import Budget

    if getattr(args, "budget", None) is None:
        return None
    return Budget.of(args.budget, model.arch).gflops


def _images(args: argparse.Namespace, model, n: int):
    """A batch of ``n`` real images from ``args.dataset`` (or random ones), shaped for the model."""
    import torch

    from prance.data import build_dataset, input_spec_for_model, make_loader, seeded_subset

    spec = input_spec_for_model(model.vit)
    if args.dataset == "random":
        return torch.randn(n, spec.in_chans, *spec.img_size, generator=torch.Generator().manual_seed(args.seed))
    ds = build_dataset(args.dataset, "test", spec, skip_bad=args.skip_bad_images)
    if len(ds) < n:
        raise PranceError(f"dataset {args.dataset} has {len(ds)} test images, fewer than the batch size {n}")
    x, _ = next(iter(make_loader(seeded_subset(ds, n, args.seed), batch_size=n)))
    return x


def cmd_flops(args: argparse.Namespace) -> dict:
    import torch

    from prance import flops
    from prance.data import input_spec_for_model
    from prance.evaluate import plan_for

    model = _load_model(args)
    cfg, plan = plan_for(model, _strategy_config(args), _budget(args, model))
    report = flops.count(model.arch, None, plan)
    spec = input_spec_for_model(model.vit)
    x = torch.randn(args.reference_batch, spec.in_chans, *spec.img_size, generator=torch.Generator().manual_seed(0))
    return {
        "model": args.model or model.vit.pretrained_cfg.get("architecture"),
        "checkpoint": _weights(args),
        "strategy": cfg.name,
        "params": plan.params,
        "gflops": report.gflops,
        "gflops_reference": flops.measured_gflops(model, x, plan=plan),
        "token_ratio": report.token_ratio,
        "final_token_ratio": report.final_token_ratio,
    }


def cmd_eval(args: argparse.Namespace) -> dict:
    from prance.data import build_dataset, input_spec_for_model, make_loader, seeded_subset
    from prance.evaluate import evaluate, plan_for

    from prance.export import commands as rowcmd

    if rowcmd.wants_row(args):  # --config / --sweep: a configuration as the sweep prints it, or a sweep row
        return rowcmd.eval_row(args, lambda a, loader: _eval_selector(a, loader))
    if args.selector:
        if args.strategy != "none" or args.r is not None or args.keep is not None:
            raise PranceError("--selector decides the token schedule itself: drop --strategy/--r/--keep")
        return _eval_selector(args)

    model = _load_model(args)
    cfg, plan = plan_for(model, _strategy_config(args), _budget(args, model))
    ds = build_dataset(args.dataset, args.split, input_spec_for_model(model.vit), skip_bad=args.skip_bad_images)
    if args.limit is not None:
        ds = seeded_subset(ds, args.limit, args.seed)
    loader = make_loader(ds, batch_size=args.batch_size, num_workers=args.workers)
    result = evaluate(model, loader, plan=plan, device=args.device, amp=args.amp, progress=True)
    result.update(latency(args, lambda x: model(x, None, plan), loader))
    return {"checkpoint": _weights(args), "strategy": cfg.name, "params": plan.params, **result, **skipped_images(args, loader, result)}


def _weights(args: argparse.Namespace) -> str:
    """Which weights a result is of: the checkpoint, timm's pretrained ones, or random."""
    if getattr(args, "random_weights", None):
        return "random-init"
    if args.pretrained:
        return "timm-pretrained"
    return str(args.checkpoint)


def _selector_config(args: argparse.Namespace):
    from prance.config import load_config, parse_overrides, validate
    from prance.selector.config import SelectorConfig

    overrides = parse_overrides(args.set)
    for key in ("checkpoint", "strategy", "budget", "budget_kind", "iterations", "seed", "dataset", "device"):
        v = getattr(args, key, None)
        if v is not None:
            overrides[key] = v
    if getattr(args, "amp", False):
        overrides["amp"] = True
    if args.config:
        return load_config(SelectorConfig, "selector", args.config, overrides, set_keys=parse_overrides(args.set))
    return validate(SelectorConfig, overrides, "selector config")


def cmd_train_selector(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from prance.selector.pipeline import run_selector
    from prance.selector.store import SELECTOR_FILE

    cfg = _selector_config(args)
    if cfg.test_limit is None and not any(item.strip().startswith("test_limit=") for item in args.set):
        cfg.test_limit = 5000  # the CLI reports held-out test figures (test_*) by default
    out = Path(args.output)
    if out.suffix == ".safetensors":
        out_dir, name = out.parent, out.name
    else:
        out_dir, name = out, SELECTOR_FILE

    if args.resume:
        from prance.selector.store import STATE_FILE

        if not (out_dir / STATE_FILE).is_file():
            raise PranceError(f"nothing to resume: no training state {out_dir / STATE_FILE} (what an interrupted "
                              f"train-selector --output {args.output} leaves)")

    def report(m: dict) -> None:
        print(
            f"[selector] it {m['iteration']:3d}: kept (it {m['best_iteration']}) val top1 {m['top1']:.2f}%  gflops {m['gflops']:.4f} "
            f"(budget {m['budget_gflops']:.4f})  latest policy {m['current_top1']:.2f}%  {m['elapsed_s']:.0f}s",
            file=sys.stderr,
        )

    result = run_selector(cfg, report, out_dir, progress=True, resume_from=out_dir if args.resume else None)
    if name != SELECTOR_FILE:
        (out_dir / SELECTOR_FILE).replace(out_dir / name)
    keys = ("top1", "gflops", "token_ratio", "final_token_ratio", "throughput_img_s", "reward")
    summary = {k: result[k] for k in keys}
    summary.update({k: v for k, v in result.items() if k.startswith("test_") or k in ("budget_gflops", "train_seconds", "schedules_per_batch", "warm_start", "warm_start_top1")})
    summary["best_iteration"] = result.get("iteration", 0)  # 0: PPO never beat its warm start on validation
    summary["selector"] = str(out_dir / name)
    return summary


def sweep_split_defaults() -> dict:
    """``val_limit`` and ``train_limit`` of the default sweep's selector settings: the
    defaults of search-static and search-cascade, whose choice then is the sweep's static
    row's (another number of validation images can choose another configuration)."""
    from prance.config import load_config
    from prance.sweep.config import SweepConfig

    selector = load_config(SweepConfig, "sweep", "default").selector
    return {"val_limit": selector.val_limit, "train_limit": selector.train_limit}


def search_split(args: argparse.Namespace, command: str):
    """The SplitSpec of ``search-static`` / ``search-cascade``: the selector's split, with
    the default sweep's validation and rollout sizes unless given."""
    from prance.config import validate
    from prance.selector.config import SelectorConfig
    from prance.splits import SplitSpec

    fields = {**sweep_split_defaults(), "test_limit": args.test_limit}
    fields.update({k: getattr(args, k) for k in ("val_limit", "train_limit") if getattr(args, k) is not None})
    if args.checkpoint:
        fields["checkpoint"] = args.checkpoint
    if args.dataset:
        fields["dataset"] = args.dataset
    return SplitSpec.of(validate(SelectorConfig, fields, command))


def _search_inputs(args: argparse.Namespace, command: str):
    """(meta-network, budget GFLOPs, the selector's image split, strategy names, progress)
    for ``search-static`` and ``search-cascade``: the same images ``train-selector`` uses."""
    from prance.checkpoint import load_checkpoint
    from prance import splits
    from prance.budget import Budget

    if args.budget is None:
        raise PranceError("--budget is required (GFLOPs, e.g. 0.03, or a share of the full sub-network, e.g. 30%)")
    names = strategy_list(args.strategies)
    for name in ("first_images", "val_limit", "test_limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise PranceError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.eta < 2:
        raise PranceError(f"--eta must be at least 2, got {args.eta}")
    spec = search_split(args, command)
    model, _ = load_checkpoint(spec.checkpoint)
    budget = Budget.of(args.budget, model.arch).gflops
    data = splits.load(model, spec, parts=("val", "test"))
    tag = command.split("-")[-1]
    say = lambda text: print(f"[{tag}] {text}", file=sys.stderr, flush=True)  # noqa: E731 -- stderr, also with --json
    return model, budget, data, names, say


def _halving(args: argparse.Namespace) -> Halving:
    return Halving(first_images=args.first_images, eta=args.eta)


def cmd_search_static(args: argparse.Namespace) -> dict:
    """The best static configuration at a budget, chosen on the selector's validation
    images and reported on its held-out test images (the same images ``train-selector``
    uses, so the numbers compare)."""
    from prance import static_search
    from prance.evaluate import evaluate
    from prance.selector.train import batches

    model, budget, data, names, say = _search_inputs(args, "search-static")
    found = static_search.search(model, budget, data["val"], names, args.uniform_only, halving=_halving(args),
                                 base=_strategy_config(args, "none"), progress=say)
    best = found.best
    val = evaluate(model, batches(*data["val"], args.batch_size), best.subnet, best.plan, progress=False)
    test = evaluate(model, batches(*data["test"], args.batch_size), best.subnet, best.plan, progress=True)
    out = {"budget_gflops": budget, "configuration": best.describe(), **{k: v for k, v in val.items() if k != "n_images"}}
    out.update({f"test_{k}": v for k, v in test.items()})
    out.update({"val_images": val["n_images"], "candidates": found.candidates, "forwards": found.forwards,
                "static": best.to_dict(), "ranked": found.to_dict()["ranked"]})
    return out


def cmd_search_cascade(args: argparse.Namespace) -> dict:
    """The best confidence cascade (cheap static configuration, then an expensive one for
    the images it is unsure of) at a mean budget, chosen on the selector's validation
    images, reported on its test images beside the best static configuration."""
    from prance import cascade
    from prance.evaluate import evaluate
    from prance.selector.train import batches

    try:
        rungs = list(cascade.RUNGS) if args.rungs is None else [float(v) for v in args.rungs.split(",") if v.strip()]
    except ValueError:
        raise PranceError(f"--rungs must be comma-separated multiples of the budget, got {args.rungs!r}") from None
    problem = cascade.ladder_problem(rungs, strategy_list(args.strategies), args.max_rungs)
    if problem:
        raise PranceError(f"--rungs/--strategies/--max-rungs: {problem}")
    model, budget, data, names, say = _search_inputs(args, "search-cascade")
    found = cascade.search(model, budget, data["val"], names, rungs, halving=_halving(args),
                           batch_size=args.batch_size, progress=say, max_rungs=args.max_rungs, margin=not args.no_margin)
    test = cascade.evaluate(model, found.best, *data["test"], batch_size=args.batch_size)
    st = found.static
    static_test = evaluate(model, batches(*data["test"], args.batch_size), st.subnet, st.plan, progress=False)
    out = {"budget_gflops": budget, "budget_kind": "mean", "configuration": found.best.describe(), "top1": found.top1,
           "gflops": found.gflops, "escalated": found.escalated, "margin": found.margin, "val_images": int(data["val"][1].shape[0])}
    out.update({f"test_{k}": v for k, v in test.items()})
    out["test_gflops_over_budget"] = test["gflops"] / budget
    out.update({"static_configuration": st.describe(), "static_top1": found.static_top1,
                "static_test_top1": static_test["top1"], "static_test_gflops": static_test["gflops"],
                "static_test_throughput_img_s": static_test["throughput_img_s"], "cascade": found.to_dict()})
    return out


def _eval_selector(args: argparse.Namespace, loader=None) -> dict:
    from prance.selector.config import SelectorConfig
    from prance.data import build_dataset, input_spec_for_model, make_loader, seeded_subset
    from prance.budget import Budget
    from prance.selector.selector import evaluate_selector
    from prance.selector.store import SELECTOR_FILE, load_selector, read_selector_header
    from prance.device import resolve as resolve_device
    from prance.selector.train import reward_fn

    from prance.artifacts import local_path

    args.selector = local_path(args.selector, getattr(args, "mlflow_uri", None), prefer=SELECTOR_FILE, what="selector")
    header = read_selector_header(args.selector)
    cfg = SelectorConfig.model_validate(header["config"])
    args.checkpoint = args.checkpoint or cfg.checkpoint  # default: the meta-network it was trained on
    model = _load_model(args)
    selector, header = load_selector(args.selector, model)
    model.to(resolve_device(args.device))
    budget = Budget.of(args.budget, model.arch).gflops if args.budget else header["extra"].get("budget_gflops") or Budget.of(cfg.budget, model.arch).gflops
    selector.check_budget(budget)
    if loader is None:
        ds = build_dataset(args.dataset, args.split, input_spec_for_model(model.vit), skip_bad=args.skip_bad_images)
        if args.limit is not None:
            ds = seeded_subset(ds, args.limit, args.seed)
        loader = make_loader(ds, batch_size=args.batch_size, num_workers=args.workers)
    lam = header["extra"].get("val", {}).get("lagrange", cfg.flops_weight)
    cfg = cfg.model_copy(update={"amp": args.amp})
    result = evaluate_selector(model, selector, loader, budget, progress=True, reward_fn=reward_fn(model, cfg, budget, lam), amp=args.amp)
    result.update(latency(args, lambda x: selector.run_episode(model, x, budget, amp=args.amp).logits, loader))
    return {"strategy": f"selector:{selector.actions.strategy}", **result, **skipped_images(args, loader, result)}


def cmd_bench(args: argparse.Namespace) -> list[dict]:
    from prance.evaluate import bench

    model = _load_model(args)
    names = strategy_list(args.strategies)
    base = _strategy_config(args, "none")
    images = _images(args, model, args.batch_size)
    rows = bench(
        model,
        images,
        names,
        _budget(args, model),
        base=base,
        warmup=args.warmup,
        repeats=args.repeats,
        device=args.device,
        amp=args.amp,
        progress=True,
        latency_runs=args.latency_images,
    )
    if args.output:
        try:
            _write_record(args.output, rows, args.device)
        except OSError as e:  # checked writable before; the disk filled up or went away since: keep the rows
            args.deferred_error = f"could not write --output {args.output} ({e.strerror or type(e).__name__}); the measured rows are above"
    return rows


def _write_record(path: str, rows: list[dict], device: str) -> None:
    """Benchmark rows with what is needed to reproduce and compare them."""
    import datetime
    import os
    import platform
    from pathlib import Path

    import torch

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    record = {
        "command": "python -m prance " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "rows": rows,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)


def _print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return ",".join(f"{k}={fmt(x)}" for k, x in v.items()) or "-"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def build_parser() -> argparse.ArgumentParser:
    from prance.export import commands as rowcmd

    parser = OneLineParser(prog="python -m prance", description="Compress Vision Transformers: FLOPs, evaluation, benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_flops_parser(sub)
    _add_eval_parser(sub)
    rowcmd.add_export_parser(sub)
    _add_train_selector_parser(sub)
    _add_search_parsers(sub)
    _add_bench_parser(sub)
    return parser


def _add_flops_parser(sub) -> None:
    """``flops``."""
    p = sub.add_parser("flops", help="analytic GFLOPs and token ratios, checked against FlopCounterMode")
    _add_model_args(p)
    _add_strategy_args(p)
    p.add_argument("--reference-batch", type=int, default=2, help="images in the FlopCounterMode forward")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)


def _add_eval_parser(sub) -> None:
    """``eval``: a model, a static configuration, a sweep row or a selector on a dataset."""
    from prance.export import commands as rowcmd

    p = sub.add_parser("eval", help="Top-1, GFLOPs, token ratios and throughput on a dataset")
    _add_model_args(p)
    _add_strategy_args(p)
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or imagefolder:PATH")
    p.add_argument("--split", default="test", help="test/val or train; with --sweep also 'sweep': the images the sweep scored its rows on")
    p.add_argument("--selector", help="a trained selector (.safetensors, or an MLflow runs:/ or models:/ URI): adaptive per-image schedules")
    p.add_argument("--limit", type=int, help="evaluate a seeded random subset of this many images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    add_skip_bad_arg(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    _add_latency_arg(p)
    p.add_argument("--json", action="store_true")
    rowcmd.add_row_args(p, mlflow_uri=False)  # --config, --sweep/--trial/--best, --storage (--mlflow-uri: _add_model_args)
    p.set_defaults(func=cmd_eval)


def _add_train_selector_parser(sub) -> None:
    """``train-selector``."""
    p = sub.add_parser("train-selector", help="train a PRANCE selector (PPO, Result-to-Go) for a budget")
    p.add_argument("--checkpoint", help="the meta-network (default: the shipped supernet, timm:prance_vit_fmnist)")
    p.add_argument("--strategy", help="prune, merge or prune_merge")
    p.add_argument("--budget", help="GFLOPs (e.g. 0.04) or share of the full sub-network (e.g. 50%%)")
    p.add_argument("--budget-kind", choices=["mean", "cap"], help="mean (default): the average GFLOPs per image within the budget; "
                                                                   "cap: every image within it")
    p.add_argument("--iterations", type=int, help="PPO updates")
    p.add_argument("--dataset", help="fashion-mnist or imagefolder:PATH")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="where the meta-network's rollouts run: cpu (default), cuda, cuda:N or auto")
    p.add_argument("--amp", action="store_true", help="the meta-network's forwards in mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--config", help="a YAML file of SelectorConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any SelectorConfig key (repeatable)")
    p.add_argument("--output", default="runs/selector", help="folder (or .safetensors path) for the selector")
    p.add_argument("--resume", action="store_true",
                   help="continue from the training state an interrupted run left in --output's folder (selector_state.pt)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_selector)


def _add_search_parsers(sub) -> None:
    """``search-static`` and ``search-cascade``."""
    p = sub.add_parser("search-static", help="the best static sub-network x token strategy at a budget")
    p.add_argument("--budget", help="GFLOPs (e.g. 0.03) or share of the full sub-network (e.g. 30%%)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="token strategies to combine with the widths")
    p.add_argument("--uniform-only", action="store_true", help="only the same width level in every stage")
    _add_search_args(p)
    _add_strategy_args(p, single=False)
    p.set_defaults(func=cmd_search_static)

    p = sub.add_parser("search-cascade", help="the best confidence cascade of up to three static configurations at a mean budget")
    p.add_argument("--budget", help="mean GFLOPs per image (e.g. 0.015) or share of the full sub-network (e.g. 20%%)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="token strategies of the ladder's static configurations")
    p.add_argument("--rungs", help="the ladder: the best static configuration at each of these multiples of the budget "
                                   "(default 0.5,0.65,0.8,1,1.6,2.5,4; the full sub-network is always a rung)")
    p.add_argument("--max-rungs", type=int, default=3, help="the most configurations an image may run: 1..3 (default 3)")
    p.add_argument("--no-margin", action="store_true", help="choose at the budget itself, without holding back the margin "
                                                             "that keeps the mean within it on unseen images")
    _add_search_args(p)
    p.set_defaults(func=cmd_search_cascade)


def _add_bench_parser(sub) -> None:
    """``bench``."""
    p = sub.add_parser("bench", help="throughput of token strategies against the dense model")
    _add_model_args(p)
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategies")
    p.add_argument("--budget", help="calibrate every strategy to this GFLOPs (e.g. 2.3) or share of dense (50%%)")
    _add_strategy_args(p, single=False)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, imagefolder:PATH or random")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="also write the rows with the command, machine and date to this JSON file")
    add_skip_bad_arg(p)
    _add_latency_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)


def add_skip_bad_arg(p: argparse.ArgumentParser) -> None:
    """``--skip-bad-images`` of the commands that read one split of an image folder (eval,
    bench): the error of an unreadable image names it (prance.data.SKIP_BAD_FLAG)."""
    from prance.data import SKIP_BAD_FLAG

    p.add_argument(SKIP_BAD_FLAG, action="store_true",
                   help="imagefolder: skip unreadable images (a warning each) and report their count as skipped_images")


def skipped_images(args: argparse.Namespace, loader, result: dict) -> dict:
    """``{"skipped_images": N}`` with --skip-bad-images: the images of ``loader``'s dataset
    that could not be read (it read ``result["n_images"]``); {} without the flag."""
    return {"skipped_images": len(loader.dataset) - result["n_images"]} if getattr(args, "skip_bad_images", False) else {}


def _add_latency_arg(p: argparse.ArgumentParser) -> None:
    from prance.evaluate import LATENCY_IMAGES

    p.add_argument("--latency-images", type=int, default=LATENCY_IMAGES,
                   help=f"time this many single images for the batch-1 latency, median and p95 ms (default {LATENCY_IMAGES}; 0: skip)")


def latency(args: argparse.Namespace, fn, batches) -> dict:
    """Batch-1 latency (median, p95 ms) of ``fn`` (images -> logits) on the first
    ``--latency-images`` images of ``batches``; {} when 0."""
    import torch

    from prance.evaluate import latency_b1

    n = getattr(args, "latency_images", 0) or 0
    if n <= 0:
        return {}
    xs, have = [], 0
    for x, _ in batches:
        xs.append(x[: n - have])
        have += xs[-1].shape[0]
        if have >= n:
            break
    return latency_b1({"model": fn}, torch.cat(xs), n, args.device)["model"]


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "repeats", "reference_batch", "limit"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise PranceError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    for name in ("warmup", "workers", "latency_images"):
        v = getattr(args, name, None)
        if v is not None and v < 0:
            raise PranceError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if getattr(args, "device", None) is not None:
        from prance.device import resolve

        resolve(args.device)
    if getattr(args, "selector", None):
        given = [f for f in ("strategy", "r", "keep", *FLAG_STRATEGIES) if getattr(args, f, None) not in (None, "none")]
        if given:
            raise PranceError(f"--selector decides the token schedule itself: drop --{given[0].replace('_', '-')}")
    elif hasattr(args, "locs"):  # the commands with strategy flags
        names = [args.strategy] if hasattr(args, "strategy") else [n.strip() for n in args.strategies.split(",") if n.strip()]
        _check_strategy_flags(args, names)
    if getattr(args, "skip_bad_images", False):
        read = "--split sweep (the sweep's held images)" if getattr(args, "split", None) == "sweep" else args.dataset
        if read != args.dataset or not args.dataset.strip().lower().startswith("imagefolder:"):
            raise PranceError(f"--skip-bad-images applies to an imagefolder:PATH dataset only, not to {read}")
    if hasattr(args, "sweep"):  # eval, export: what picks a configuration
        from prance.export.commands import check_row_args

        check_row_args(args)
    _check_outputs(args)


OUTPUT_FOLDERS = ("train-selector", "export")  # commands whose --output is a folder (the others write a file)


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path writable, before any work starts (prance.paths)."""
    from prance.paths import check_output_dir, check_output_file

    out = getattr(args, "output", None)
    if not out:
        return
    if args.command in OUTPUT_FOLDERS and not out.endswith(".safetensors"):
        check_output_dir(out, "--output")
    else:
        check_output_file(out, "--output")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        result = args.func(args)
    except PranceError as e:
        print(f"prance: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (add --resume to continue from the last evaluation saved in --output)" if args.command == "train-selector" else ""
        print(f"prance: interrupted{hint}", file=sys.stderr)
        return 130
    if getattr(args, "random_weights", None) and args.command in ("eval", "bench"):
        print(f"prance: warning: {args.random_weights} has no shipped checkpoint and none was given: these are the "
              "figures of a randomly initialised model (pass --checkpoint)", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    elif isinstance(result, list):
        columns = ["strategy", "params", "gflops", "flops_speedup", "throughput_img_s", "speedup", "final_token_ratio"]
        _print_table(result, columns + [c for c in ("latency_b1_median_ms", "latency_b1_p95_ms") if c in result[0]])
    else:
        for k, v in result.items():  # nested records (the configurations in full) are in --json
            if isinstance(v, dict) and all(isinstance(x, (int, float, str, bool)) for x in v.values()):
                v = ",".join(f"{name}={x:.4g}" if isinstance(x, float) else f"{name}={x}" for name, x in v.items()) or "-"
            if not isinstance(v, (dict, list)):
                print(f"{k:18s} {v:.4g}" if isinstance(v, float) else f"{k:18s} {v}")
    if getattr(args, "deferred_error", None):  # the work is done and printed; only saving it failed
        print(f"prance: error: {args.deferred_error}", file=sys.stderr)
        return 1
    return 0
