"""The budget sweep: its config, plan, search space and report (no Ray), bad input (one
line, exit 2, nothing in MLflow), and real sweeps of the micro meta-network on a local Ray:
against a real `mlflow server`, and interrupted then resumed (tests/test_ray_jobs.py runs
one with `ray job submit`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from prance.config import load_config
from prance.sweep.config import ParamSpace, SweepConfig
from prance.errors import PranceError
from prance.sweep import report as rep
from prance.sweep.plan import plan_sweep
from prance.sweep.space import DefineByRun
from prance.sweep.trial import TrialContext, score, validation_images

from conftest import descendants, free_port, mlflow_client, ray_workers, reap, sweep_runs, tiny_args

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "sweeps" / "budget_sweep.py"
METRICS = ["top1", "gflops", "token_ratio", "final_token_ratio", "throughput_img_s"]


def run_sweep(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------------------ no Ray needed


def test_presets_and_config_errors():
    default = load_config(SweepConfig, "sweep", "default")
    assert len(default.budgets) >= 3
    assert {"prune", "merge", "prune_merge", "free_prune", "free_merge", "free_prune_merge", "free_ppt"} <= set(default.strategies)
    tiny = load_config(SweepConfig, "sweep", "tiny", {"selector.iterations": 6, "space.actor_lr.high": 0.01})
    assert tiny.selector.iterations == 6 and tiny.space["actor_lr"].high == 0.01  # dotted overrides reach nested keys
    cases = {
        "unknown key 'selector.iteration'": {"selector.iteration": 3},
        "unknown strategy 'ppt_free'": {"strategies": ["ppt_free"]},
        "space.gamma: value 1.5 is invalid": {"space": {"gamma": {"low": 0.9, "high": 1.5}}},
        "not a tunable selector setting": {"space": {"budget": {"choices": ["50%"]}}},
        "selector.budget is set by the sweep": {"selector.budget": "50%"},
        "selector.device is set by the sweep": {"selector.device": "cuda"},  # use_gpu decides
        "unknown key 'space.clip.hi'": {"space": {"clip": {"low": 0.1, "hi": 0.3}}},
    }
    for message, overrides in cases.items():
        with pytest.raises(PranceError, match=message):
            load_config(SweepConfig, "sweep", "tiny", overrides)


def test_default_plan_has_static_rows_at_every_budget_and_needs_tokens_at_the_lowest_two():
    """Issue 11: the default sweep sets the selectors beside the static baselines at every
    budget, at budgets where the smallest sub-network alone does not fit (the lowest two)."""
    default = load_config(SweepConfig, "sweep", "default")
    plan = plan_sweep(default)
    labels = {c.label for c in plan.trials}
    for b in default.budgets:
        assert {f"static_merge@{b}", f"static_prune_merge@{b}", f"merge@{b}", f"prune_merge@{b}"} <= labels, b
    low = sorted(default.budgets, key=lambda b: float(b.rstrip("%")))[:2]
    assert {f"static@{b}" for b in low} <= {c.label for c in plan.unreachable}


def test_plan_orders_trials_and_marks_unreachable_combos(micro_checkpoint):
    cfg = SweepConfig(checkpoint=str(micro_checkpoint), budgets=["55%", "75%"], strategies=["prune", "merge", "free_prune", "free_ppt", "static_merge"],
                      trials_per_combo=2, selector={"decision_blocks": [1, 2, 3]})
    plan = plan_sweep(cfg)
    assert [c.label for c in plan.trials if c.method == "static"] == ["static_merge@55%", "static_merge@75%"]
    methods = [c.method for c in plan.trials]
    assert methods[0] == "dense" and plan.trials[0].budget == "100%"
    assert methods == sorted(methods, key=["dense", "training_free", "static", "selector"].index)  # fixed ones first
    selector = [c.label for c in plan.trials if c.method == "selector"]
    assert selector == ["prune@55%", "merge@55%", "prune@75%", "merge@75%"] * 2  # round-robin, trials_per_combo times
    # PPT prunes at 3 blocks only: 55% of the micro model is out of its reach, 75% is not
    assert [c.label for c in plan.unreachable] == ["free_ppt@55%"]
    assert "free_ppt@75%" in [c.label for c in plan.trials]
    assert all(c.param.startswith(("keep=", "r=")) for c in plan.trials if c.method == "training_free")


@pytest.mark.parametrize(
    "budgets,message",
    [(["150%"], "above the dense model"), (["1%"], "below what any strategy of this sweep reaches"),
     (["fast"], "neither GFLOPs"), (["50%", "0.000467488"], "are the same GFLOPs")],
)
def test_budgets_outside_the_reachable_range_are_refused(micro_checkpoint, budgets, message):
    cfg = SweepConfig(checkpoint=str(micro_checkpoint), budgets=budgets, strategies=["free_prune", "free_merge"])
    with pytest.raises(PranceError, match=message):
        plan_sweep(cfg)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_define_by_run_space_is_conditional_and_follows_the_schedule():
    space = {
        "actor_lr": ParamSpace(low=1e-4, high=1e-2, log=True).model_dump(),
        "ppo_epochs": ParamSpace(low=2, high=6).model_dump(),
        "reward_form": ParamSpace(choices=["penalty", "constrained"]).model_dump(),
        "over_weight": ParamSpace(low=0.5, high=4, when={"reward_form": "penalty"}).model_dump(),
        "lagrange_lr": ParamSpace(low=0.1, high=2, when={"reward_form": "constrained"}).model_dump(),
    }
    schedule = [{"method": "training_free", "strategy": "free_prune"}] + [{"method": "selector", "strategy": "prune"}] * 11
    fn = DefineByRun(schedule, space, {})
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True, n_startup_trials=3))
    forms = set()
    for number in range(len(schedule)):
        trial = study.ask()
        constants = fn(trial)
        assert constants["trial_number"] == number and constants["strategy"] == schedule[number]["strategy"]
        if number == 0:
            assert trial.params == {}  # training-free: no PPO parameters
        else:
            p = trial.params
            assert isinstance(p["ppo_epochs"], int) and 1e-4 <= p["actor_lr"] <= 1e-2
            assert ("over_weight" in p) == (p["reward_form"] == "penalty")
            assert ("lagrange_lr" in p) == (p["reward_form"] == "constrained")
            forms.add(p["reward_form"])
        study.tell(trial, float(number))
    assert forms == {"penalty", "constrained"}


@pytest.mark.parametrize("grace, max_t, rf", [(10, 40, 2.0), (2, 4, 2.0), (3, 100, 3.0), (5, 5, 2.0), (4, 50, 4.0)])
def test_asha_rungs_are_rays(grace, max_t, rf):
    from ray.tune.schedulers import ASHAScheduler

    from prance.sweep.tune import asha_rungs

    bracket = ASHAScheduler(time_attr="iteration", metric="score", mode="max", max_t=max_t, grace_period=grace,
                            reduction_factor=rf)._brackets[0]
    assert asha_rungs(grace, max_t, rf) == sorted(m for m, _ in bracket._rungs)


def test_selector_trials_checkpoint_at_asha_rungs_and_every_grace_period():
    """Issue 36 part 6: a checkpoint at the first report at or past each of ASHA's rungs (the
    report ASHA judges, and stops, a trial at) and every grace period between them; every
    report without ASHA."""
    from prance.sweep.trial import checkpoint_due
    from prance.sweep.tune import checkpoint_iterations

    imagenet = load_config(SweepConfig, "sweep", "deit_s_imagenet")  # 40 iterations, reports every 5, grace 10, rf 2
    at = checkpoint_iterations(imagenet)
    assert at == (10, 20, 30, 40)
    reports = range(imagenet.selector.eval_every, imagenet.selector.iterations + 1, imagenet.selector.eval_every)
    assert [it for prev, it in zip([0, *reports], reports) if checkpoint_due(at, prev, it)] == [10, 20, 30, 40]
    odd = load_config(SweepConfig, "sweep", "tiny", {"selector.iterations": 27, "selector.eval_every": 4, "grace_period": 3,
                                                      "reduction_factor": 3.0})
    assert checkpoint_iterations(odd) == (3, 6, 9, 12, 15, 18, 21, 24, 27)
    # reports at 4, 8, ...: the rung at 9 is judged at the report of 12, which carries a checkpoint
    assert checkpoint_due(checkpoint_iterations(odd), 8, 12) and not checkpoint_due((10, 20), 12, 16)
    assert checkpoint_iterations(imagenet.model_copy(update={"scheduler": "fifo"})) == ()
    assert checkpoint_iterations(imagenet.model_copy(update={"multi_objective": True})) == ()
    assert checkpoint_due((), 5, 10)  # no ASHA: every report


def test_score_and_report_pick_the_best_within_budget(tmp_path):
    assert score(80.0, 1.0, 1.0, 79.0, 200) == pytest.approx(1.0)
    assert score(80.0, 1.1, 1.0, 79.0, 200) == pytest.approx(1.0 - 20.0)  # 10% over the budget costs 20 points
    rows = [
        dict(trial_number=0, method="dense", strategy="dense", budget="100%", budget_gflops=2.0, status="finished", top1=90.0, gflops=2.0),
        dict(trial_number=1, method="training_free", strategy="free_prune", budget="50%", budget_gflops=1.0, status="finished", top1=85.0, gflops=0.99),
        dict(trial_number=2, method="selector", strategy="prune", budget="50%", budget_gflops=1.0, status="finished", top1=89.0, gflops=1.05, actor_lr=1e-3),
        dict(trial_number=3, method="selector", strategy="prune", budget="50%", budget_gflops=1.0, status="stopped", top1=87.0, gflops=0.98, actor_lr=3e-4),
        dict(trial_number=4, method="selector", strategy="prune", budget="50%", budget_gflops=1.0, status="interrupted"),
        dict(method="training_free", strategy="free_ppt", budget="50%", budget_gflops=1.0, status="unreachable", note="lowest 1.2"),
    ]
    df = rep.results_frame(rows, ["actor_lr"])
    assert list(df.columns[: len(rep.LEAD_COLUMNS)]) == rep.LEAD_COLUMNS and "actor_lr" in df.columns
    by_n = df.set_index("trial_number")
    assert not by_n.loc[2, "within_budget"] and by_n.loc[3, "within_budget"]
    # Pareto front: #3 (cheapest), #2, dense; #1 is beaten by #3 (cheaper and more accurate)
    assert set(df[df["pareto"] == True]["trial_number"]) == {0, 2, 3}  # noqa: E712
    best = rep.best_per_combo(df).set_index("strategy")
    assert best.loc["prune", "trial_number"] == 3  # 87% within the budget beats 89% over it
    assert best.loc["free_ppt", "status"] == "unreachable"
    table = rep.summary_table(df, ["actor_lr"])
    assert "actor_lr=0.0003" in table and "unreachable" in table
    png = rep.plot_pareto(df, tmp_path / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_free_trials_use_the_selectors_validation_images(micro_checkpoint):
    from prance.checkpoint import load_checkpoint
    from prance.selector.config import SelectorConfig
    from prance.splits import SplitSpec, load

    selector = SelectorConfig(val_limit=50, train_limit=20, seed=3).model_dump()
    ctx = TrialContext(str(micro_checkpoint), "fashion-mnist", selector)
    model, _ = load_checkpoint(micro_checkpoint)
    x, y = validation_images(ctx, model)
    ref_x, ref_y = load(model, SplitSpec.of(SelectorConfig(checkpoint=str(micro_checkpoint), val_limit=50, train_limit=20, seed=3)))["val"]
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)


# -------------------------------------------------------------------------- bad input


def _bad_input_cases(tmp: Path, checkpoint: Path) -> dict[str, tuple[list[str], str]]:
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("budgets: [50%\nstrategies: prune\n")
    typo = tmp / "typo.yaml"
    typo.write_text("budgets: ['50%']\nstrategys: [free_prune]\n")
    closed = free_port()
    return {
        "unknown strategy": (tiny_args(checkpoint, "--set", "strategies=[free_prune,tome]"), "unknown strategy 'tome'"),
        "budget above dense": (tiny_args(checkpoint, "--set", "budgets=[120%]"), "above the dense model"),
        "budget below reach": (tiny_args(checkpoint, "--set", "budgets=[2%]"), "below what any strategy"),
        "missing checkpoint": (tiny_args(tmp / "nope.safetensors"), "not found"),
        "missing dataset": (tiny_args(checkpoint, "--set", f"dataset=imagefolder:{tmp}/no-such-folder"), "does not exist"),
        "invalid yaml": (["--config", str(bad_yaml)], "is not valid YAML"),
        "misspelt key": (["--config", str(typo)], "unknown key 'strategys'"),
        "mlflow unreachable": (tiny_args(checkpoint, "--mlflow-uri", f"http://127.0.0.1:{closed}"), "is unreachable"),
    }


@pytest.mark.parametrize("case", ["unknown strategy", "budget above dense", "budget below reach", "missing checkpoint",
                                  "missing dataset", "invalid yaml", "misspelt key", "mlflow unreachable"])
def test_bad_input_is_one_line_exit_2_and_nothing_in_mlflow(tmp_path, micro_checkpoint, capsys, case):
    sys.path.insert(0, str(SWEEP.parent))
    try:
        import budget_sweep
    finally:
        sys.path.pop(0)
    args, message = _bad_input_cases(tmp_path, micro_checkpoint)[case]
    storage = tmp_path / "storage"
    rc = budget_sweep.main([*args, "--storage", str(storage), "--name", "bad"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("budget_sweep: error:") and message in err[0], err
    assert not (storage / "mlflow.db").exists() and not (storage / "bad").exists()  # nothing written


def test_bad_input_from_the_command_line(tmp_path, micro_checkpoint):
    proc = run_sweep(*tiny_args(micro_checkpoint, "--set", "strategies=[prune,freeprune]"), "--storage", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("budget_sweep: error:") and "unknown strategy 'freeprune'" in last
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------- real sweeps on Ray


def check_report(folder: Path, stdout: str, statuses_done=("finished", "stopped")) -> pd.DataFrame:
    df = pd.read_csv(folder / "results.csv")
    for col in rep.LEAD_COLUMNS + ["actor_lr", "entropy_coef", "reward_form"]:
        assert col in df.columns, col
    trials = df[df["status"] != "unreachable"]
    assert set(trials["status"]) <= set(statuses_done), trials[["trial_number", "status"]]
    assert set(trials["method"]) == {"dense", "training_free", "static", "cascade", "selector"}
    cascade = trials[trials["method"] == "cascade"]
    assert (cascade["gflops"] <= cascade["budget_gflops"] * (1 + 1e-9)).all() and (cascade["meets"] != "none").all()
    assert (cascade["gflops_max"] >= cascade["gflops"]).all() and cascade["param"].str.startswith("widths=").all()
    static = trials[trials["method"] == "static"]
    assert static["param"].str.startswith("widths=").all()  # the configuration its search chose
    finished_selectors = trials[(trials["method"] == "selector") & (trials["status"] == "finished")]
    assert all(Path(p).name == "selector.safetensors" and Path(p).is_file() for p in finished_selectors["selector_path"])
    assert trials[METRICS].notna().all().all()
    assert (folder / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    lines = stdout.strip().splitlines()
    assert lines[-2].endswith(str(folder / "pareto.png")) and lines[-1].startswith("MLflow UI: ")
    return df


DONE_LINE = re.compile(r"^\[\s*\d+:\d+\]\s+\d+/\d+ ")  # the driver's line for an ended trial


@pytest.mark.slow
def test_tiny_sweep_against_a_real_mlflow_server_that_restarts(tmp_path, micro_checkpoint, mlflow_server):
    """The server is stopped after three trials and started again two trials later: the
    sweep goes on, queues its MLflow writes, and ends with every run complete."""
    args = tiny_args(micro_checkpoint, "--set", "max_concurrent_trials=1", "--storage", str(tmp_path), "--name", "srv",
                     "--mlflow-uri", mlflow_server.uri)
    proc = subprocess.Popen([sys.executable, str(SWEEP), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    import threading

    errors: list[str] = []
    state = {"ended": 0, "stopped_at": None, "restarted": False}
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()

    def restart_when_due() -> None:  # two trials later, or as soon as the driver waits for the server
        while proc.poll() is None:
            at = state["stopped_at"]
            if at is not None and (state["ended"] >= at + 2 or any("waiting up to" in e for e in errors)):
                mlflow_server.start()
                state["restarted"] = True
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=restart_when_due, daemon=True)
    watcher.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if DONE_LINE.match(line):
            state["ended"] += 1
            if state["ended"] == 3:
                mlflow_server.stop()
                state["stopped_at"] = 3
    proc.wait(timeout=300)
    reader.join(timeout=10)
    watcher.join(timeout=60)
    stopped_at = state["stopped_at"]
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), "".join(errors))
    assert stopped_at is not None and "stopped answering" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert state["restarted"] and "answers again" in proc.stdout
    mlflow_server = mlflow_server.uri
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Best configuration per budget x strategy" in proc.stdout
    df = check_report(tmp_path / "srv", proc.stdout)
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server
    client, runs = sweep_runs(mlflow_server, "srv")
    trial_runs = [r for r in runs if r.data.tags.get("prance.kind") == "sweep-trial"]
    summary = [r for r in runs if r.data.tags.get("prance.kind") == "sweep-summary"]
    assert len(trial_runs) == int((df["status"] != "unreachable").sum()) and len(summary) == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    sweep_ids = {r.data.tags["prance.sweep_id"] for r in runs}
    assert len(sweep_ids) == 1
    for r in trial_runs:
        tags, metrics = r.data.tags, r.data.metrics
        assert {"budget", "strategy", "method", "prance.trial_id"} <= set(tags)
        assert set(METRICS) <= set(metrics), (tags["strategy"], sorted(metrics))
        row = df[df["trial_number"] == int(tags["prance.trial_number"])].iloc[0]
        assert metrics["top1"] == pytest.approx(row["top1"]) and row["mlflow_run_id"] == r.info.run_id
        if tags["method"] == "static":
            assert tags["prance.configuration"] == row["param"] and row["param"].startswith("widths=")
        if tags["method"] == "selector":
            assert {"actor_lr", "entropy_coef", "reward_form", "clip", "gamma", "iterations"} <= set(r.data.params)
            assert "reward" in metrics
            steps = sorted(h.step for h in client.get_metric_history(r.info.run_id, "top1"))
            if row["status"] == "finished":
                assert steps == [2, 4]  # per iteration, then the final metrics at the last one
            else:
                assert row["status"] == "stopped" and steps == [2]  # ASHA stopped it at its first rung
            assert [a.path for a in client.list_artifacts(r.info.run_id, "selector")] == ["selector/selector.safetensors"]
    artifacts = {a.path for a in client.list_artifacts(summary[0].info.run_id)}
    assert {"results.csv", "pareto.png"} <= artifacts


@pytest.mark.slow
def test_sweep_survives_a_killed_trial_a_killed_driver_and_ctrl_c(tmp_path, micro_checkpoint):
    """Faults as users on spot machines meet them, one sweep: a selector trial's worker
    process SIGKILLed mid-trial (Tune retries it from its checkpoint: it continues, not
    restarts), the driver SIGKILLed, the resumed driver stopped with Ctrl-C, a second
    resume. In the end: every trial once in results.csv, one FINISHED MLflow run per trial,
    each iteration's metrics logged once; a corrupted Tune state refuses to resume in one line."""
    args = tiny_args(micro_checkpoint, "--set", "max_concurrent_trials=1", "--set", "trials_per_combo=2",
                     "--set", "selector.iterations=8", "--set", "max_failures=1", "--storage", str(tmp_path), "--name", "cut")
    proc = subprocess.Popen([sys.executable, str(SWEEP), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True)
    seen, killed_trial, children = [], None, []
    for line in proc.stdout:
        seen.append(line)
        if killed_trial is None and " it   2/8" in line and "prune@" in line:
            trials = ray_workers(proc.pid, "ray::ImplicitFunc")
            assert len(trials) == 1, "".join(seen)
            trials[0].kill()  # SIGKILL the trial's worker process
            killed_trial = line.split("#")[1].split()[0]
        elif killed_trial is not None and re.search(r" it +\d+/8", line) and f"#{killed_trial} " not in line:
            children = descendants(proc.pid)
            proc.kill()  # SIGKILL the driver while the next selector trial runs
            break
    proc.wait(timeout=60)
    reap(children)
    out = "".join(seen)
    assert killed_trial is not None and children, out[-3000:]
    assert "Tune retries it from its last checkpoint" in out
    its = [int(m.group(1)) for ln in seen if f"#{killed_trial} " in ln for m in [re.search(r" it +(\d+)/8", ln)] if m]
    # continued from its checkpoint at 2 -- or, when the kill came before Tune had committed
    # that checkpoint (the progress line is printed first), from its start; never a gap
    assert its[:2] in ([2, 4], [2, 2]) and its[1:] == sorted(its[1:]), out[-3000:]

    # resume, and Ctrl-C the resumed driver during a selector trial
    proc = subprocess.Popen([sys.executable, str(SWEEP), "--resume", "--name", "cut", "--storage", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(r" it +\d+/8", line):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    if proc.returncode != 0:  # the Ctrl-C came before the sweep's last trial ended
        assert proc.returncode == 130 and "--resume --name cut" in out, out[-3000:]
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        _, runs = sweep_runs(uri, "cut")
        assert not [r for r in runs if r.info.status == "RUNNING"]
        again = run_sweep("--resume", "--name", "cut", "--storage", str(tmp_path))
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        out = again.stdout
    df = check_report(tmp_path / "cut", out)
    trials = df[df["status"] != "unreachable"]
    assert len(trials) == 1 + 4 + 2 + 2 + 4 and trials["trial_number"].is_unique  # dense + training-free + static + cascade + 2 x 2 selector
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, runs = sweep_runs(uri, "cut")
    assert not [r for r in runs if r.info.status != "FINISHED"]
    trial_runs = [r for r in runs if r.data.tags.get("prance.kind") == "sweep-trial"]
    numbers = Counter(r.data.tags["prance.trial_number"] for r in trial_runs)
    assert len(numbers) == len(trials) == 13 and set(numbers.values()) == {1}  # one run per trial: no duplicates
    assert sum(r.data.tags.get("prance.kind") == "sweep-summary" for r in runs) == 1
    for r in trial_runs:
        if r.data.tags["method"] == "selector":
            steps = [h.step for h in client.get_metric_history(r.info.run_id, "score")]
            assert len(steps) == len(set(steps)), (r.data.tags["prance.trial_number"], steps)  # each iteration once
    killed = next(r for r in trial_runs if r.data.tags["prance.trial_number"] == killed_trial)
    steps = sorted(h.step for h in client.get_metric_history(killed.info.run_id, "score"))
    assert steps == [2, 4, 6, 8]  # every iteration's report once: no gap, no repeat

    # a corrupted Tune state: one line, exit 2, results.csv untouched
    for state in (tmp_path / "cut").glob("experiment_state-*.json"):
        state.write_text(state.read_text()[:40])
    before = (tmp_path / "cut" / "results.csv").read_bytes()
    bad = run_sweep("--resume", "--name", "cut", "--storage", str(tmp_path))
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr and bad.stderr.strip().splitlines()[-1].startswith("budget_sweep: error: cannot resume")
    assert (tmp_path / "cut" / "results.csv").read_bytes() == before


def test_mlflow_writes_queued_in_an_outage_outlive_a_killed_driver(tmp_path, mlflow_server, monkeypatch):
    """SweepRuns against a real server that stops: what it queues is on disk under the
    sweep's folder; a new SweepRuns on that folder (what --resume makes after the driver
    was killed) replays it in order once the server is back: per-iteration metrics, a run
    created during the outage, the selector artifact (its checkpoint folder gone by then),
    the final status. A replay cut short and replayed again logs no step twice."""
    import json
    import shutil

    from prance import tracking
    from prance.sweep.runs import QUEUE_FILE, QUEUE_FOLDER, SweepRuns

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once, not after minutes of retries
    uri = mlflow_server.uri
    experiment = tracking.ensure_experiment(uri, "prance-sweep-queue")
    queue = tmp_path / "sweep" / QUEUE_FOLDER
    runs = SweepRuns(uri, experiment, "queue-1", queue_dir=queue)
    runs.open(0, "t0", "prune@55%#0", {"actor_lr": 1e-3}, {"method": "selector"})
    runs.log(0, {"score": 1.0, "top1": 50.0}, 2)
    assert not queue.exists()  # nothing waits, nothing on disk
    mlflow_server.stop()
    runs.log(0, {"score": 2.0, "top1": 60.0}, 4)
    runs.open(1, "t1", "merge@55%#1", {"actor_lr": 2e-3}, {"method": "selector"})
    runs.log(1, {"score": 3.0}, 2)
    checkpoint = tmp_path / "checkpoint_000001"
    checkpoint.mkdir()
    (checkpoint / "selector.safetensors").write_bytes(b"the selector's bytes")
    runs.close(0, "FINISHED", "finished", {"trial_wall_s": 12.5}, step=4, artifacts=checkpoint)
    lines = (queue / QUEUE_FILE).read_text().splitlines()
    assert [json.loads(line)["op"] for line in lines] == ["metrics", "create", "params", "metrics", "final", "artifact", "status"]
    shutil.rmtree(checkpoint)  # Tune keeps two checkpoints per trial: this one is gone by the time MLflow is back
    del runs  # the driver is killed: nothing drained

    mlflow_server.start()
    resumed = SweepRuns(uri, experiment, "queue-1", queue_dir=queue)
    assert len(resumed.pending) == 7
    assert resumed.flush(force=True) and not queue.exists()
    client = mlflow_client(uri)
    first, second = (client.get_run(resumed.run_ids[n]) for n in (0, 1))
    assert first.info.status == "FINISHED" and first.data.tags["prance.status"] == "finished"
    assert first.data.metrics["trial_wall_s"] == 12.5 and first.data.metrics["top1"] == 60.0
    assert [a.path for a in client.list_artifacts(first.info.run_id, "selector")] == ["selector/selector.safetensors"]
    assert second.info.status == "RUNNING" and second.data.params["actor_lr"] == "0.002"
    assert second.data.tags["prance.trial_number"] == "1" and second.data.tags["prance.sweep_id"] == "queue-1"

    queue.mkdir(parents=True)  # the same metrics replayed once more, by yet another driver
    (queue / QUEUE_FILE).write_text("\n".join(line for line in lines if json.loads(line)["op"] == "metrics") + "\n")
    assert SweepRuns(uri, experiment, "queue-1", queue_dir=queue).flush(force=True)
    steps = {n: sorted(h.step for h in client.get_metric_history(resumed.run_ids[n], "score")) for n in (0, 1)}
    assert steps == {0: [2, 4], 1: [2]}


def test_trial_runs_nest_under_the_sweeps_parent_run_and_record_their_images(tmp_path, micro_checkpoint):
    """SweepRuns on a real MLflow store (sqlite): the parent run is made once and found
    again by a resumed driver; every trial run names it in mlflow.parentRunId (also a run
    an older sweep made without it, once reopened); each run records the split's parts it
    read as dataset inputs (name, digest, context; no copy of the images), and the parent
    becomes the summary run."""
    import json

    from prance import splits, tracking
    from prance.checkpoint import load_checkpoint
    from prance.data import input_spec_for_model
    from prance.sweep.runs import SUMMARY_KIND, TAG_NUMBER, TRIAL_KIND, SweepRuns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "prance-sweep-nest")
    image_spec = input_spec_for_model(load_checkpoint(micro_checkpoint)[0].vit)
    spec = splits.SplitSpec(dataset="fashion-mnist", checkpoint=str(micro_checkpoint), val_limit=64, train_limit=32,
                            rollouts_from="holdout")
    records = splits.inputs(spec, image_spec)
    assert json.loads(json.dumps(records)) == records == splits.inputs(spec, image_spec)  # plain data (queued as JSON), stable
    other = splits.inputs(splits.SplitSpec(**{**spec.__dict__, "val_limit": 65}), image_spec)
    assert other["val"]["digest"] != records["val"]["digest"] != records["train"]["digest"]

    runs = SweepRuns(uri, exp, "nest-1")
    parent = runs.open_parent("nest", {"budgets": "['50%']"}, list(records.values()))
    runs.open(0, "t0", "dense#0", {"val_limit": 64}, {"method": "dense"}, [records["val"]])
    runs.close(0, "FINISHED", "finished")
    c = mlflow_client(uri)
    old = c.create_run(exp, tags={tracking.TAG_KIND: TRIAL_KIND, tracking.TAG_SWEEP: "nest-1", TAG_NUMBER: "1"}).info.run_id

    resumed = SweepRuns(uri, exp, "nest-1")  # a resumed driver
    assert resumed.open_parent("nest", {"budgets": "['50%']"}, list(records.values())) == parent
    resumed.open(1, "t1", "prune@50%#1", {}, {"method": "selector"}, [records["val"], records["train"]])
    resumed.open(2, "t2", "prune@50%#2", {}, {"method": "selector"}, [records["val"], records["train"]])
    for n in (1, 2):
        resumed.close(n, "FINISHED", "finished")
    assert resumed.summary("nest", {"budgets": "['50%']"}, [], {"trials_finished": 3}, {"complete": "true"}) == parent

    runs = c.search_runs([exp])
    trials = {r.data.tags[TAG_NUMBER]: r for r in runs if r.data.tags[tracking.TAG_KIND] == TRIAL_KIND}
    assert [r.info.run_id for r in runs if r.data.tags[tracking.TAG_KIND] == SUMMARY_KIND] == [parent]
    assert trials["1"].info.run_id == old and len(trials) == 3
    assert {r.data.tags.get(tracking.PARENT_RUN_ID) for r in trials.values()} == {parent}
    seen = {n: sorted((d.dataset.name, d.dataset.digest, d.tags[0].value) for d in r.inputs.dataset_inputs) for n, r in trials.items()}
    val = ("fashion-mnist-validation", records["val"]["digest"], "validation")
    rollouts = ("fashion-mnist-rollouts", records["train"]["digest"], "training")
    assert seen == {"0": [val], "1": [rollouts, val], "2": [rollouts, val]}
    summary = c.get_run(parent)
    assert summary.info.status == "FINISHED" and summary.data.params["budgets"] == "['50%']"
    assert summary.data.metrics["trials_finished"] == 3 and len(summary.inputs.dataset_inputs) == 2


def test_a_corrupt_trial_checkpoint_falls_back_to_the_one_before(tmp_path, micro_checkpoint, capsys):
    """A selector trial restored from a truncated checkpoint (a disk that filled up) goes
    on from the checkpoint before it, with a warning; with none readable it starts over
    instead of failing."""
    from ray import tune

    from prance.checkpoint import load_checkpoint, load_state, save_state
    from prance.selector.config import SelectorConfig
    from prance.selector.selector import Selector
    from prance.selector.store import SELECTOR_FILE, STATE_FILE, save_selector
    from prance.sweep.tune import restore_checkpoint

    meta, _ = load_checkpoint(micro_checkpoint)
    selector = Selector.for_config(meta, SelectorConfig(checkpoint=str(micro_checkpoint), decision_blocks=[1, 2, 3]))
    trial = tmp_path / "t0003-prune-55pct-abc"
    for i in (1, 2):
        folder = trial / f"checkpoint_00000{i}"
        save_selector(folder / SELECTOR_FILE, selector, {}, {"iteration": 2 * i})
        save_state(folder / STATE_FILE, {"iteration": 2 * i, "adam": torch.ones(64) * i})
    state = trial / "checkpoint_000002" / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    workdir = tmp_path / "work"
    newest = tune.Checkpoint.from_directory(str(trial / "checkpoint_000002"))
    assert restore_checkpoint(newest, workdir)
    assert load_state(workdir / STATE_FILE)["iteration"] == 2  # the checkpoint before
    err = capsys.readouterr().err
    assert "checkpoint_000002 is unreadable" in err and "continues from its earlier checkpoint" in err

    (trial / "checkpoint_000001" / SELECTOR_FILE).write_bytes(b"not a safetensors file")
    assert not restore_checkpoint(newest, workdir)
    assert workdir.is_dir() and not any(workdir.iterdir())
    assert "starts again from its beginning" in capsys.readouterr().err


def test_a_sigterm_in_a_gc_callback_of_a_trial_prints_no_traceback(tmp_path):
    """What ended a clean default sweep's output: a trial's actor stopped by Ray got its
    SIGTERM while Python ran a weakref callback; Ray's handler raised SystemExit(1) there
    and Python printed "Exception ignored in ... SystemExit: 1" (found in a Ray worker's
    log). The trial's hook leaves that print out, and only that one."""
    code = """
import signal, sys, weakref
from prance.rayinit import quiet_sigterm_in_callbacks
quiet_sigterm_in_callbacks()
quiet_sigterm_in_callbacks()  # a reused actor runs the trainable again: one hook
def on_sigterm(signum, frame):  # as ray._private.worker's handler
    raise SystemExit(1)
signal.signal(signal.SIGTERM, on_sigterm)
class Thing: pass
def gone(ref, kind=sys.argv[1]):
    if kind == "sigterm":
        signal.raise_signal(signal.SIGTERM)
    else:
        raise ValueError("a real bug in a callback")
t = Thing(); r = weakref.ref(t, gone); del t
print("still running")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet = subprocess.run([sys.executable, "-c", code, "sigterm"], capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 0 and quiet.stdout == "still running\n" and quiet.stderr == "", quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code, "bug"], capture_output=True, text=True, env=env, timeout=120)
    assert "ValueError: a real bug in a callback" in loud.stderr and "Exception ignored" in loud.stderr


@pytest.mark.slow
def test_mlflow_gone_for_good_exits_3_and_resume_writes_the_runs(tmp_path, micro_checkpoint, mlflow_server):
    """The server goes away after the first trial and stays away past mlflow_wait_s: the
    sweep ends its trials, writes results.csv, keeps its queued MLflow writes on disk and
    exits 3; once the server is back, --resume writes every run (per-iteration metrics,
    the selector artifact, the summary run) and exits 0."""
    import threading

    args = tiny_args(micro_checkpoint, "--set", "max_concurrent_trials=1", "--set", "budgets=[75%]",
                     "--set", "strategies=[free_merge,prune]", "--set", "mlflow_wait_s=0",
                     "--storage", str(tmp_path), "--name", "gone", "--mlflow-uri", mlflow_server.uri)
    proc = subprocess.Popen([sys.executable, str(SWEEP), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if DONE_LINE.match(line):
            mlflow_server.stop()  # after the dense trial, for good
    proc.wait(timeout=300)
    reader.join(timeout=10)
    out, err = "".join(lines), "".join(errors)
    assert proc.returncode == 3, out[-3000:] + err[-3000:]
    assert "stopped answering" in err and "MLflow is behind" in err and "--resume --name gone" in err
    df = pd.read_csv(tmp_path / "gone" / "results.csv")
    trials = df[df["status"] != "unreachable"]
    assert set(trials["status"]) <= {"finished", "stopped"} and {"dense", "training_free", "selector"} == set(trials["method"])
    assert (tmp_path / "gone" / "mlflow_queue" / "queue.jsonl").is_file()

    mlflow_server.start()
    again = run_sweep("--resume", "--name", "gone", "--storage", str(tmp_path))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "MLflow write(s) the interrupted session had queued" in again.stdout
    assert not (tmp_path / "gone" / "mlflow_queue").exists()
    client, runs = sweep_runs(mlflow_server.uri, "gone")
    trial_runs = [r for r in runs if r.data.tags.get("prance.kind") == "sweep-trial"]
    assert len(trial_runs) == len(trials) and sum(r.data.tags.get("prance.kind") == "sweep-summary" for r in runs) == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in trial_runs:
        row = trials[trials["trial_number"] == int(r.data.tags["prance.trial_number"])].iloc[0]
        assert r.data.metrics["top1"] == pytest.approx(row["top1"])
        if r.data.tags["method"] == "selector":  # written during the outage: every iteration, the artifact
            steps = sorted(h.step for h in client.get_metric_history(r.info.run_id, "top1"))
            assert steps == ([2, 4] if row["status"] == "finished" else [2])
            assert [a.path for a in client.list_artifacts(r.info.run_id, "selector")] == ["selector/selector.safetensors"]


# ------------------------------------------------------------------ budget kinds, cascade


def test_within_budget_is_judged_by_the_budget_kind(tmp_path):
    """A mean result is within when its mean is; a cap result only when every image is
    (its max); a static row (no spread) costs its GFLOPs on every image and meets both."""
    rows = [
        {"trial_number": n, "method": "cascade", "strategy": "cascade", "budget": "20%", "budget_gflops": 1.0, "budget_kind": k,
         "status": "finished", "top1": 90.0, "gflops": 0.9, "gflops_p95": 1.8, "gflops_max": 2.0}
        for n, k in ((1, "mean"), (2, "cap"))
    ] + [{"trial_number": 3, "method": "static", "strategy": "static", "budget": "20%", "budget_gflops": 1.0,
          "budget_kind": "cap", "status": "finished", "top1": 89.0, "gflops": 0.95}]
    df = rep.results_frame(rows, []).set_index("trial_number")
    assert df.loc[1, "within_budget"] and not df.loc[2, "within_budget"]
    assert [df.loc[n, "meets"] for n in (1, 2, 3)] == ["mean", "mean", "cap"]
    assert df.loc[3, "gflops_max"] == df.loc[3, "gflops_p95"] == 0.95 and df.loc[3, "within_budget"]


def test_cascade_cells_are_planned_for_mean_budgets_only(micro_checkpoint):
    def plan(kind):
        return plan_sweep(SweepConfig(checkpoint=str(micro_checkpoint), budgets=["55%"], budget_kind=kind,
                                      strategies=["static_merge", "cascade"], selector={"decision_blocks": [1, 2, 3]}))

    mean = plan("mean")
    assert [c.label for c in mean.trials] == ["dense@100%", "static_merge@55%", "cascade@55%"]
    assert mean.trials[-1].budget_kind == "mean" and mean.budgets["55%"].kind == "mean"
    cap = plan("cap")
    assert [(c.label, c.note) for c in cap.unreachable] == [("cascade@55%", "meets mean budgets only, not cap")]


def test_the_cascade_trial_shares_its_ladder_per_budget_and_meets_the_mean(micro_checkpoint, tmp_path):
    from prance.sweep import cascade_trial
    from prance.sweep.config import CascadeSettings, StaticSearchSettings
    from prance.sweep.methods import run_trial

    selector = {"val_limit": 120, "train_limit": 40, "rollouts_from": "holdout", "seed": 0, "batch_size": 64}
    ctx = TrialContext(str(micro_checkpoint), "fashion-mnist", selector, static=StaticSearchSettings(first_images=30).model_dump(),
                       cascade=CascadeSettings(rungs=[0.6, 1.6]).model_dump())
    plan = plan_sweep(SweepConfig(checkpoint=str(micro_checkpoint), budgets=["50%", "70%"], strategies=["cascade"],
                                  selector={"decision_blocks": [1, 2, 3], "val_limit": 120, "train_limit": 40,
                                            "rollouts_from": "holdout"}))
    cells = [c for c in plan.trials if c.method == "cascade"]
    before = cascade_trial.LADDER_CALLS["computed"]
    reports = []
    finals = [run_trial({**c.as_config(), "trial_number": i}, ctx, lambda m, f: reports.append(m), tmp_path)
              for i, c in enumerate(cells + cells)]  # every cell twice: the second finds its ladder
    assert cascade_trial.LADDER_CALLS["computed"] - before == len(cells) == 2
    for c, final in zip(cells + cells, finals):
        assert final["gflops"] <= c.budget_gflops * (1 + 1e-9)  # the mean over the evaluated images
        assert final["gflops_p95"] <= final["gflops_max"] and final["configuration"].startswith("widths=")
    assert finals[0]["top1"] == finals[2]["top1"] and len(reports) == 4
