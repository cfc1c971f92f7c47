"""A sweep row as something to run again: the row of a trial, or the best row of a budget,
read from the sweep's ``results.csv``, turned into the configuration it stands for.

- ``dense``, ``training_free`` and ``static`` rows are static configurations
  (:class:`prance.static_search.StaticConfig`): the full widths with the strategy's
  parameter for the first two, the configuration string the search chose for the third.
- ``cascade`` rows are a confidence cascade of static configurations
  (:class:`prance.cascade.Cascade`), read back from the description the trial recorded.
- ``selector`` rows are a trained selector: ``selector_path`` in results.csv (older sweeps:
  found in the trial's folder from its trial id).
- ``controller`` rows are a trained multi-pass controller (:mod:`prance.selector.passes`),
  its file in ``selector_path`` too.
- A selector or controller file on remote storage (``s3://...`` in ``selector_path``) is
  fetched once into the local report folder's ``fetched/`` and read from there.

The meta-network and dataset are the sweep's (``sweep.json``), and
:meth:`SweepRow.validation_images` are the images the sweep scored the row on, so
``evaluate`` on them gives the row's Top-1 again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from prance.errors import PranceError
from prance.storage import local_file
from prance.sweep import store

RESULTS_FILE = "results.csv"
DONE = ("finished", "stopped")  # as prance.sweep.report.DONE
FETCHED = "fetched"  # under the local report folder: selector files of a sweep on remote storage, copied to be read


def trained_file(method: str) -> str | None:
    """The file a trial of ``method`` keeps in its checkpoint for its row to run again
    (the selector's or the controller's), or None for methods that train nothing."""
    if method == "selector":
        from prance.selector.store import SELECTOR_FILE

        return SELECTOR_FILE
    if method == "controller":
        from prance.selector.passes import CONTROLLER_FILE

        return CONTROLLER_FILE
    return None


def selector_path(checkpoint, method: str = "selector") -> str | None:
    """The selector (or controller) file of a Tune ``Checkpoint`` (a URI on remote storage)."""
    file = trained_file(method)
    if checkpoint is None:
        return None
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local") if fs is not None else "local"
    path = f"{str(checkpoint.path).rstrip('/')}/{file}"
    return path if kind == "local" else f"{kind}://{path}"


def read_results(storage: str, name: str):
    """The sweep's results table (pandas)."""
    import pandas as pd

    path = store.report_folder(storage, name) / RESULTS_FILE
    if not path.is_file():
        if store.read_settings(storage, name) is None:
            raise PranceError(f"no sweep {name!r} in {store.absolute_storage(storage)}")
        raise PranceError(f"sweep {name!r} has no {RESULTS_FILE} yet ({path}): it has not finished a session")
    try:
        return pd.read_csv(path)
    except Exception as e:
        raise PranceError(f"{path} is not a readable results table ({type(e).__name__})") from None


@dataclass
class SweepRow:
    """One row of a sweep, with what is needed to run it: ``meta`` (the sweep's
    meta-network), and ``static`` (a StaticConfig), ``cascade`` (a Cascade),
    ``controller`` (a passes.Controller, its file in ``row['selector_path']``) or ``selector`` (a
    selector file)."""

    sweep: str
    row: dict
    checkpoint: str  # the meta-network
    dataset: str
    selector_settings: dict = field(default_factory=dict)  # the sweep's shared SelectorConfig fields
    static: object | None = None  # StaticConfig
    cascade: object | None = None  # prance.cascade.Cascade
    selector: str | None = None
    meta: object | None = None  # MetaViT
    controller: object | None = None  # prance.selector.passes.Controller

    @property
    def trial_number(self) -> int | None:
        v = self.row.get("trial_number")
        return None if _nan(v) else int(v)

    @property
    def method(self) -> str:
        return str(self.row.get("method"))

    @property
    def top1(self) -> float:
        return float(self.row.get("top1"))

    def describe(self) -> str:
        if self.static is not None:
            return self.static.describe()
        if self.cascade is not None:
            return self.cascade.describe()
        if self.controller is not None:
            return self.controller.describe()
        return f"selector {self.selector}"

    def validation_images(self):
        """(x, y): the images the sweep scored its rows on (the selector's validation images)."""
        from prance import splits

        spec = splits.SplitSpec.of_settings(self.dataset, self.checkpoint, self.selector_settings)
        return splits.load(self.meta, spec, parts=("val",))["val"]

    def test_images(self, limit: int | None = None):
        """(x, y): the sweep's test images (disjoint from its validation and rollout images;
        the first ``limit`` of them), the same for every row of the sweep."""
        from dataclasses import replace

        from prance import splits

        spec = splits.SplitSpec.of_settings(self.dataset, self.checkpoint, self.selector_settings)
        return splits.load(self.meta, replace(spec, test_limit=limit if limit is not None else 10**9), parts=("test",))["test"]

    def run(self, x, batch_size: int = 256):
        """(logits, GFLOPs of each image) of the row's configuration on the images ``x``: a
        static configuration costs the same on every image, a cascade the rungs an image
        ran, a selector what its episode spent (its own cost included)."""
        import torch

        from prance import cascade as casc

        if self.static is not None:
            logits = casc.logits_of(self.meta, self.static, x, batch_size)
            return logits, torch.full((x.shape[0],), float(self.static.gflops), dtype=torch.float64)
        if self.cascade is not None:
            logits, passes = casc.forward(self.meta, self.cascade, x, batch_size)
            return logits, torch.tensor(self.cascade.costs(), dtype=torch.float64)[passes - 1]
        if self.controller is not None:
            from prance.selector import passes

            logits, _, spent = passes.run(self.meta, self.controller, x, batch_size)
            return logits, spent
        return self._run_selector(x, batch_size)

    def _run_selector(self, x, batch_size: int):
        import torch

        from prance.selector.store import load_selector

        if getattr(self, "_selector", None) is None:
            self._selector = load_selector(self.selector, self.meta)[0]
        budget = float(self.row["budget_gflops"])
        logits, gflops = [], []
        with torch.inference_mode():
            for i in range(0, x.shape[0], batch_size):
                ep = self._selector.run_episode(self.meta, x[i : i + batch_size], budget)
                logits.append(ep.logits.float().cpu())
                gflops.append(ep.macs.double().cpu() / 1e9)
        return torch.cat(logits), torch.cat(gflops)


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _settings(storage: str, name: str) -> dict:
    settings = store.read_settings(storage, name)
    if settings is None:
        raise PranceError(f"no sweep {name!r} in {store.absolute_storage(storage)} (no {store.SWEEP_FILE})")
    return settings


def _find_selector(storage: str, name: str, row: dict) -> str:
    path = row.get("selector_path")
    if not _nan(path):
        return str(path)
    trial_id = row.get("trial_id")
    if not _nan(trial_id):  # sweeps from before selector_path: the trial's last checkpoint
        from prance.selector.store import SELECTOR_FILE

        found = sorted(Path(store.experiment_path(storage, name)).glob(f"*{trial_id}*/checkpoint_*/{SELECTOR_FILE}"))
        if found:
            return str(found[-1])
    raise PranceError(f"trial {row.get('trial_number')} of sweep {name} kept no selector checkpoint")


def load_row(storage: str, name: str, row: dict) -> SweepRow:
    """The configuration of ``row`` (a dict of results.csv) on the sweep's meta-network."""
    from prance import static_search
    from prance.checkpoint import load_checkpoint, locate
    from prance.selector.config import DEFAULT_CHECKPOINT
    from prance.sweep.plan import resolve_dataset

    settings = _settings(storage, name)
    cfg = settings.get("config", {})
    checkpoint = locate(cfg.get("checkpoint", DEFAULT_CHECKPOINT))  # a file: exports copy it
    dataset = resolve_dataset(cfg.get("dataset", "fashion-mnist"))
    meta, _ = load_checkpoint(checkpoint)
    out = SweepRow(name, row, checkpoint, dataset, dict(cfg.get("selector") or {}), meta=meta)
    method = row.get("method")
    if row.get("status") not in DONE:
        raise PranceError(f"trial {row.get('trial_number')} of sweep {name} did not finish (status {row.get('status')})")
    fetched = store.report_folder(storage, name) / FETCHED  # a trained file on remote storage is read from a local copy
    if method == "selector":
        out.selector = local_file(_find_selector(storage, name, row), fetched)
        return out
    if method == "controller":
        from prance.selector import passes

        if _nan(row.get("selector_path")):
            raise PranceError(f"trial {row.get('trial_number')} of sweep {name} kept no controller checkpoint")
        out.row = {**row, "selector_path": local_file(str(row["selector_path"]), fetched)}
        out.controller = passes.load(out.row["selector_path"], meta)
        return out
    top = ",".join([str(static_search.num_levels(meta.space) - 1)] * len(meta.space.stage_starts))
    token = row.get("token_strategy") or "none"
    if method == "cascade":
        from prance import cascade

        if _nan(row.get("param")):
            raise PranceError(f"trial {row.get('trial_number')} of sweep {name} records no cascade")
        out.cascade = cascade.parse(str(row["param"]), meta)
        return out
    if method == "static":
        text = row.get("param")
    elif method == "training_free":
        text = f"widths={top} {token} {row.get('param')}"
    elif method == "dense":
        text = f"widths={top} none"
    else:
        raise PranceError(f"trial {row.get('trial_number')} of sweep {name} has unknown method {method!r}")
    if _nan(text):
        raise PranceError(f"trial {row.get('trial_number')} of sweep {name} records no configuration")
    out.static = static_search.parse(str(text), meta)
    if method in ("dense", "training_free"):  # the full meta-network, not the space's widest level
        from dataclasses import replace

        from prance import flops

        s = out.static
        out.static = replace(s, subnet=meta.full_subnet, report=flops.count(meta.arch, meta.full_subnet, s.plan))
    return out


def trial_row(storage: str, name: str, number: int) -> SweepRow:
    """Trial ``number`` of sweep ``name`` (the ``trial_number`` column)."""
    df = read_results(storage, name)
    hit = df[df["trial_number"] == number]
    if not len(hit):
        known = sorted(int(v) for v in df["trial_number"].dropna())
        span = f"{known[0]}..{known[-1]}" if known else "none"
        raise PranceError(f"sweep {name} has no trial {number} (trials {span})")
    return load_row(storage, name, _record(hit.iloc[0]))


def _record(series) -> dict:
    return {k: (None if _nan(v) else v) for k, v in series.to_dict().items()}


def best(storage: str, name: str, budget: str | float, method: str | None = None) -> SweepRow:
    """The best row of ``budget`` (its label in the sweep, e.g. ``"20%"``, or its GFLOPs):
    the highest Top-1 among finished rows within the budget (ties: fewer GFLOPs), over
    every method or only ``method`` (selector, cascade, static, training_free)."""
    df = read_results(storage, name)
    df = df[df["method"] != "dense"]
    label = str(budget).strip()
    at = df[df["budget"].astype(str).str.strip() == label]
    if not len(at):
        try:
            g = float(label)
            at = df[(df["budget_gflops"] - g).abs() <= 1e-9 * max(abs(g), 1e-12)]
        except ValueError:
            pass
    if not len(at):
        budgets = ", ".join(sorted({str(b) for b in df["budget"].dropna()}))
        raise PranceError(f"sweep {name} has no budget {label!r} (budgets: {budgets})")
    ok = at[at["status"].isin(DONE) & at["top1"].notna() & (at["within_budget"].astype(str) == "True")]
    if method is not None:
        ok = ok[ok["method"] == method]
    if not len(ok):
        raise PranceError(f"sweep {name} has no finished row within budget {label}" + (f" for method {method}" if method else ""))
    row = ok.sort_values(["top1", "gflops"], ascending=[False, True], kind="mergesort").iloc[0]
    return load_row(storage, name, _record(row))
