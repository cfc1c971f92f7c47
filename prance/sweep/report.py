"""The sweep's report: one results table (a row per trial, plus the combos no trial could
run), the Pareto front of Top-1 vs GFLOPs, the plot, and the printed summary."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from prance import tracking
from prance.budget import within
from prance.sweep.methods import DENSE, METHODS

METRIC_COLUMNS = [tracking.TOP1, tracking.GFLOPS, tracking.TOKEN_RATIO, tracking.FINAL_TOKEN_RATIO,
                  tracking.THROUGHPUT, tracking.REWARD]
SPREAD_COLUMNS = ["gflops_p95", "gflops_max", "meets"]  # per-image GFLOPs spread; budget kinds met (cap / mean / none)
LEAD_COLUMNS = ["trial_number", "trial_id", "method", "strategy", "token_strategy", "budget", "budget_gflops", "budget_kind",
                "status", "within_budget", "pareto", *METRIC_COLUMNS, *SPREAD_COLUMNS, "score", "baseline_top1", "iteration",
                "param", "wall_s", "body_s", "mlflow_run_id"]
# status: finished (ran to its end), stopped (by ASHA), error, interrupted (resume to finish it),
# pending (not started before an interruption), unreachable (the strategy cannot meet the
# budget on this model: no trial ran)
DONE = ("finished", "stopped")


def _order(method) -> float:
    m = METHODS.get(method) if isinstance(method, str) else None
    return m.order if m is not None else len(METHODS)


def _fill_spread(df: pd.DataFrame) -> None:
    """A row without a per-image spread costs the same on every image (a static
    configuration): p95 and max are its GFLOPs; ``meets`` from mean and max."""
    from prance.budget import meets

    for col in ("gflops_p95", "gflops_max"):
        df[col] = df[col].where(df[col].notna(), df[tracking.GFLOPS])
    df["meets"] = [meets(g, mx, b) if pd.notna(g) and pd.notna(b) else None
                   for g, mx, b in zip(df[tracking.GFLOPS], df["gflops_max"], df["budget_gflops"])]


def pareto_mask(df: pd.DataFrame) -> pd.Series:
    """Rows no other row dominates (at least as good on Top-1 and GFLOPs, better on one);
    identical points are all on the front."""
    ok = df["status"].isin(DONE) & df[tracking.TOP1].notna() & df[tracking.GFLOPS].notna()
    mask = pd.Series(False, index=df.index)
    best, at = -math.inf, None
    for i in df[ok].sort_values([tracking.GFLOPS, tracking.TOP1], ascending=[True, False], kind="mergesort").index:
        top1, gflops = df.at[i, tracking.TOP1], df.at[i, tracking.GFLOPS]
        if top1 > best or (top1 == best and gflops == at):
            mask[i] = True
            best, at = top1, gflops
    return mask


def results_frame(rows: list[dict], param_names: list[str]) -> pd.DataFrame:
    """Rows -> the results table: fixed columns first, then the hyper-parameters."""
    df = pd.DataFrame(rows)
    for col in LEAD_COLUMNS:
        if col not in df.columns:
            df[col] = None
    if len(df):
        done = df["status"].isin(DONE) & df[tracking.GFLOPS].notna()
        _fill_spread(df)
        kinds = df["budget_kind"].fillna("mean")
        df["within_budget"] = [bool(within(mx if k == "cap" else g, b)) if d else None
                               for g, mx, b, k, d in zip(df[tracking.GFLOPS], df["gflops_max"], df["budget_gflops"], kinds, done)]
        df["pareto"] = pareto_mask(df)
    df["trial_number"] = pd.array(df["trial_number"], dtype="Int64")
    for col in _integer_columns(rows, df.columns):  # a column missing in some rows would be written 2.0
        df[col] = pd.array([None if _isnan(v) else int(v) for v in df[col]], dtype="Int64")
    params = [p for p in param_names if p in df.columns]
    rest = [c for c in df.columns if c not in LEAD_COLUMNS and c not in params]
    df = df[LEAD_COLUMNS + params + rest]
    df = df.assign(_m=df["method"].map(_order), _n=df["trial_number"].fillna(1e9))
    return df.sort_values(["_m", "_n", "budget_gflops", "strategy"]).drop(columns=["_m", "_n"]).reset_index(drop=True)


INTEGER_COLUMNS = ("iteration", "best_iteration")


def _integer_columns(rows: list[dict], columns) -> list[str]:
    """Columns holding integers: the known ones, SelectorConfig's int fields (ppo_epochs,
    rollout_images, ...), and any whose values are all Python ints."""
    import typing

    from prance.selector.config import SelectorConfig

    fields = {k for k, f in SelectorConfig.model_fields.items() if f.annotation is int or int in typing.get_args(f.annotation)
              and float not in typing.get_args(f.annotation)}
    out = []
    for col in columns:
        if col == "trial_number":
            continue
        values = [r[col] for r in rows if col in r and not _isnan(r[col])]
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            continue
        if (col in INTEGER_COLUMNS or col in fields) and all(float(v).is_integer() for v in values) \
                or all(isinstance(v, int) for v in values):
            out.append(col)
    return out


def best_per_combo(df: pd.DataFrame) -> pd.DataFrame:
    """Per budget x strategy: the best Top-1 among trials within the budget (else the
    trial closest to it, flagged), or the reason there is none."""
    out = []
    for (budget, strategy), g in df[df["method"] != DENSE.name].groupby(["budget", "strategy"], sort=False):
        done = g[g["status"].isin(DONE) & g[tracking.TOP1].notna()]
        ok = done[done["within_budget"] == True]  # noqa: E712 (object column)
        if len(ok):
            row = ok.loc[ok[tracking.TOP1].idxmax()]
        elif len(done):
            row = done.loc[(done[tracking.GFLOPS] / done["budget_gflops"]).idxmin()]
        else:
            row = g.iloc[0]
        out.append(row)
    if not out:
        return df.iloc[0:0]
    best = pd.DataFrame(out)
    return best.sort_values(["budget_gflops", "method", "strategy"]).reset_index(drop=True)


def _fmt(v, spec: str) -> str:
    return "-" if _isnan(v) else format(v, spec)


def summary_table(df: pd.DataFrame, param_names: list[str]) -> str:
    """The printed table: the best configuration per budget x strategy."""
    best = best_per_combo(df)
    header = f"{'budget':>7} {'strategy':<18} {'top1%':>6} {'GFLOPs':>8} {'fits':>4} {'tokens':>6} {'img/s':>6}  {'trial':>5}  configuration"
    lines = [header, "-" * len(header)]
    dense = df[df["method"] == DENSE.name]
    if len(dense) and dense.iloc[0]["status"] in DONE:
        d = dense.iloc[0]
        lines.append(f"{'100%':>7} {'dense':<18} {_fmt(d[tracking.TOP1], '6.2f')} {_fmt(d[tracking.GFLOPS], '8.4g')} {'':>4} "
                     f"{_fmt(d[tracking.FINAL_TOKEN_RATIO], '6.2f')} {_fmt(d[tracking.THROUGHPUT], '6.0f')}  {int(d['trial_number']):>5}")
    for _, r in best.iterrows():
        if r["status"] not in DONE:
            why = {"unreachable": f"unreachable ({r.get('note') or 'below the lowest GFLOPs'})"}.get(r["status"], r["status"])
            lines.append(f"{r['budget']:>7} {r['strategy']:<18} {'':>6} {'':>8} {'':>4} {'':>6} {'':>6}  {'':>5}  {why}")
            continue
        if METHODS[r["method"]].searches and r.get("best_iteration") == 0:  # PPO never beat its warm start
            conf = f"its static start, PPO never beat it: {r.get('warm_start') or '-'}"
        elif METHODS[r["method"]].searches:
            conf = ", ".join(f"{p}={_short(r.get(p))}" for p in param_names if p in r and r.get(p) is not None and not _isnan(r.get(p)))
        else:
            conf = r.get("param") or ""
        fits = "yes" if r["within_budget"] else "NO"
        trial = "-" if _isnan(r["trial_number"]) else str(int(r["trial_number"]))
        lines.append(f"{r['budget']:>7} {r['strategy']:<18} {_fmt(r[tracking.TOP1], '6.2f')} {_fmt(r[tracking.GFLOPS], '8.4g')} {fits:>4} "
                     f"{_fmt(r[tracking.FINAL_TOKEN_RATIO], '6.2f')} {_fmt(r[tracking.THROUGHPUT], '6.0f')}  {trial:>5}  {conf}")
    return "\n".join(lines)


def _isnan(v) -> bool:
    return v is None or (not isinstance(v, (str, list, dict, tuple)) and bool(pd.isna(v)))


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def plot_pareto(df: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Top-1 vs GFLOPs: a series per strategy, the Pareto front, the budgets, the dense model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    done = df[df["status"].isin(DONE) & df[tracking.TOP1].notna()]
    for strategy, g in done[done["method"] != DENSE.name].groupby("strategy", sort=True):
        m = METHODS[g["method"].iloc[0]]
        ax.scatter(g[tracking.GFLOPS], g[tracking.TOP1], label=strategy, marker=m.marker,
                   alpha=0.8, s=36 if m.searches else 44, edgecolors="none" if m.searches else "k")
    front = done[df.loc[done.index, "pareto"] == True].sort_values(tracking.GFLOPS)  # noqa: E712
    if len(front):
        ax.step(front[tracking.GFLOPS], front[tracking.TOP1], where="post", color="0.3", lw=1, ls="--", label="Pareto front")
    dense = done[done["method"] == DENSE.name]
    if len(dense):
        ax.scatter(dense[tracking.GFLOPS], dense[tracking.TOP1], marker="*", s=220, color="gold", edgecolors="k", zorder=5, label="dense")
    # identical points (trials that chose the same configuration) would hide each other: say how many
    for (g, t), same in done.groupby([tracking.GFLOPS, tracking.TOP1]):
        if len(same) > 1:
            ax.annotate(f"x{len(same)}", (g, t), textcoords="offset points", xytext=(5, 4), fontsize=7, color="0.25")
    budgets = df[df["method"] != DENSE.name].dropna(subset=["budget_gflops"]).drop_duplicates("budget_gflops")
    for _, row in budgets.sort_values("budget_gflops").iterrows():
        ax.axvline(row["budget_gflops"], color="0.8", lw=0.8, ls=":", zorder=0)
        ax.annotate(f"budget {row['budget']}", (row["budget_gflops"], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(2, -10), textcoords="offset points", fontsize=7, color="0.4", rotation=90, va="top")
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("Top-1 (%) on the validation images")
    ax.set_title(title or "Top-1 vs GFLOPs (dotted lines: budgets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
