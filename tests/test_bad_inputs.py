"""One table of user mistakes, by kind, through the real entry points: ``python -m prance``
(``prance.cli.main``), ``sweeps/budget_sweep.py`` and ``sweeps/pretrain.py`` (their
``main``). Each case must exit with code 2, print exactly one stderr line
``<prog>: error: ...`` matching its message, nothing on stdout, and lose nothing: no
half-made sweep folder, no output file, files that were there unchanged.

Most cases run the entry point in this process (the same ``main`` a subprocess runs,
without ~20 s of imports per case on a busy 2-core machine); every check they exercise
comes before Ray starts and before any training. A few run as real subprocesses, where
what a process prints besides prance's line (Ray's and torch's warnings) is the point.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import call_main

ROOT = Path(__file__).resolve().parent.parent
MICRO = "prance_vit_micro"


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"_prance_script_{name}", ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_entry(entry: str, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(args)`` of an entry point, in this process."""
    if entry == "prance":
        from prance.cli import main
    else:
        main = _script_main(entry)
    return call_main(main, args)


def run_process(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_AUTH_MODE", None)  # as a user's shell has it: Ray's own default
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def assert_one_line(code: int, out: str, err: str, prog: str, match: str) -> str:
    assert code == 2, (code, err)
    assert "Traceback" not in out + err
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert re.search(match, lines[0]), (match, lines[0])
    return lines[0]


_FLAGS: dict[tuple, set[str]] = {}


def flags_of(entry: str, args: list[str]) -> set[str]:
    """The options the command of ``args`` accepts, read from its ``--help``."""
    key = (entry, args[0] if entry == "prance" else None)
    if key not in _FLAGS:
        code, out, _ = run_entry(entry, [*key[1:], "--help"] if key[1] else ["--help"])
        assert code == 0, out
        _FLAGS[key] = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", out))
    return _FLAGS[key]


def assert_named_flags_exist(entry: str, args: list[str], line: str) -> None:
    """Advice must be followable: every --flag an error line names is one of the command's."""
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", line))
    assert named <= flags_of(entry, args), (sorted(named - flags_of(entry, args)), line)


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> its sha256: what "nothing lost or changed" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real inputs for the cases: a micro checkpoint, a regular file where a folder is
    expected, a file that is not a database, an image folder with one truncated JPEG, a
    sweep storage holding an earlier sweep's results and a sweep that never started."""
    import numpy as np
    from PIL import Image

    from prance.checkpoint import save_checkpoint
    from prance.models import create_meta

    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    save_checkpoint(root / "micro.safetensors", create_meta(MICRO), MICRO)
    (root / "a_file").write_text("not a folder\n")
    (root / "garbage.db").write_bytes(bytes(range(256)) * 8)
    (root / "selector_bad_kind.yaml").write_text("budget: 50%\nbudget_kind: median\n")
    rng = np.random.default_rng(0)
    for cls in ("ants", "bees"):
        (root / "images" / "test" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(root / "images" / "test" / cls / f"{i}.jpg")
    bad = root / "images" / "test" / "ants" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    # a sweep storage: an earlier sweep's finished report, and a sweep that stopped before its trials
    storage = root / "sweeps"
    (storage / "earlier").mkdir(parents=True)
    (storage / "earlier" / "results.csv").write_text("trial_number,status,top1,method,budget,budget_gflops,gflops,within_budget,param\n"
                                                     "0,finished,80.5,static,20%,0.01,0.009,True,\"widths=0,0,0,0 none\"\n")
    (storage / "earlier" / "sweep.json").write_text(json.dumps({"name": "earlier", "created": 1.0, "config": {"checkpoint": str(root / "micro.safetensors")}}))
    (storage / "halfmade").mkdir()
    (storage / "halfmade" / "sweep.json").write_text(json.dumps({"name": "halfmade", "created": 2e9, "mlflow_uri": "sqlite:///x.db", "config": {}}))
    return root


SWEEP = "budget_sweep"
# (entry point, arguments, the message the one line must match). {tmp}: the files fixture.
CASES = {
    # --- unwritable outputs, refused before any work
    "bench_output_unwritable": ("prance", ["bench", "--model", MICRO, "--dataset", "random", "--output", "/proc/prance-x/bench.json"],
                                r"--output /proc/prance-x/bench\.json is not writable"),
    "bench_output_under_file": ("prance", ["bench", "--model", MICRO, "--dataset", "random", "--output", "{tmp}/a_file/bench.json"],
                                r"a_file is a file, not a folder"),
    "bench_output_is_folder": ("prance", ["bench", "--model", MICRO, "--dataset", "random", "--output", "{tmp}"],
                               r"is a folder, not a file"),
    "selector_output_unwritable": ("prance", ["train-selector", "--checkpoint", "{tmp}/micro.safetensors", "--output", "/proc/prance-x"],
                                   r"--output /proc/prance-x is not writable"),
    "selector_output_under_file": ("prance", ["train-selector", "--checkpoint", "{tmp}/micro.safetensors", "--output", "{tmp}/a_file/sel"],
                                   r"a_file is a file, not a folder"),
    "sweep_storage_unwritable": (SWEEP, ["--preset", "tiny", "--storage", "/proc/prance-x"], r"--storage /proc/prance-x is not writable"),
    "sweep_storage_is_file": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/a_file"], r"a_file is a file, not a folder"),
    "pretrain_storage_unwritable": ("pretrain", ["--preset", "smoke", "--storage", "/proc/prance-x"], r"--storage /proc/prance-x is not writable"),
    "pretrain_export_under_file": ("pretrain", ["--preset", "smoke", "--storage", "{tmp}/pt", "--export", "{tmp}/a_file/x.safetensors"],
                                   r"a_file is a file, not a folder"),
    # --- MLflow tracking URIs, refused before anything is written
    "sweep_mlflow_unknown_scheme": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--mlflow-uri", "bogus://x"], r"unknown scheme 'bogus'"),
    "sweep_mlflow_not_a_uri": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--mlflow-uri", "mlruns"], r"is not a URI"),
    "sweep_mlflow_not_a_database": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--mlflow-uri", "sqlite:///{tmp}/garbage.db"],
                                    r"cannot be opened"),
    "sweep_mlflow_db_unwritable": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--mlflow-uri", "sqlite:////proc/prance-x/m.db"],
                                   r"not writable"),
    "pretrain_mlflow_unknown_scheme": ("pretrain", ["--preset", "smoke", "--storage", "{tmp}/pt", "--mlflow-uri", "bogus://x"], r"unknown scheme"),
    # --- budgets: one rule for every command
    "flops_budget_150pct": ("prance", ["flops", "--model", MICRO, "--strategy", "merge", "--budget", "150%"], r"above the dense model.*nothing to compress"),
    "flops_budget_1e9": ("prance", ["flops", "--model", MICRO, "--strategy", "merge", "--budget", "1e9"], r"nothing to compress"),
    "bench_budget_150pct": ("prance", ["bench", "--model", MICRO, "--dataset", "random", "--budget", "150%"], r"nothing to compress"),
    "search_static_budget_150pct": ("prance", ["search-static", "--checkpoint", "{tmp}/micro.safetensors", "--budget", "150%"], r"nothing to compress"),
    "selector_budget_150pct": ("prance", ["train-selector", "--checkpoint", "{tmp}/micro.safetensors", "--budget", "150%", "--output", "{tmp}/sel150"],
                               r"nothing to compress"),
    # --- values accepted silently before
    "pretrain_num_workers_0": ("pretrain", ["--preset", "smoke", "--num-workers", "0", "--storage", "{tmp}/pt"], r"--num-workers must be at least 1"),
    "threshold_given_to_merge": ("prance", ["flops", "--model", MICRO, "--strategy", "merge", "--threshold", "1e-4"], r"--threshold applies to strategy ppt only"),
    "schedule_given_to_prune": ("prance", ["eval", "--model", MICRO, "--strategy", "prune", "--schedule", "decreasing", "--limit", "8"],
                                r"--schedule applies to strategy merge only"),
    "fuse_given_to_merge_bench": ("prance", ["bench", "--model", MICRO, "--strategies", "none,merge", "--fuse", "--dataset", "random"],
                                  r"--fuse applies to strategy prune only"),
    "locs_given_to_none": ("prance", ["flops", "--model", MICRO, "--locs", "1"], r"--locs applies to"),
    "strategy_flag_with_selector": ("prance", ["eval", "--selector", "{tmp}/none.safetensors", "--threshold", "1e-4"], r"--selector decides"),
    "random_init_with_checkpoint": ("prance", ["flops", "--checkpoint", "{tmp}/micro.safetensors", "--random-init"], r"--random-init cannot"),
    # --- datasets: an unreadable image is named with the remedy the command has
    "corrupt_image": ("prance", ["eval", "--model", MICRO, "--dataset", "imagefolder:{tmp}/images"], r"unreadable image .*ants/1\.jpg .*--skip-bad-images"),
    "corrupt_image_eval_config": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 none",
                                             "--dataset", "imagefolder:{tmp}/images"], r"unreadable image .*ants/1\.jpg .*pass --skip-bad-images"),
    "corrupt_image_bench": ("prance", ["bench", "--model", MICRO, "--dataset", "imagefolder:{tmp}/images", "--batch-size", "6"],
                            r"unreadable image .*ants/1\.jpg .*pass --skip-bad-images"),
    "corrupt_image_search_static": ("prance", ["search-static", "--checkpoint", "{tmp}/micro.safetensors", "--dataset", "imagefolder:{tmp}/images",
                                               "--budget", "50%", "--val-limit", "2", "--train-limit", "2", "--test-limit", "2"],
                                    r"unreadable image .*ants/1\.jpg .*: remove or replace the file$"),
    "skip_bad_images_not_imagefolder": ("prance", ["eval", "--model", MICRO, "--skip-bad-images", "--limit", "8"],
                                        r"--skip-bad-images applies to an imagefolder:PATH dataset only, not to fashion-mnist"),
    # --- MLflow URIs as checkpoints: the store's error names a flag the command has
    "flops_runs_uri_without_store": ("prance", ["flops", "--checkpoint", "runs:/0123/model"], r"MLflow store .*mlflow\.db does not exist \(pass --mlflow-uri"),
    # --- resume
    "resume_only_unstarted_sweep": (SWEEP, ["--resume", "--storage", "{tmp}/sweeps"], r"nothing to resume: .*halfmade never started its trials"),
    "resume_named_unstarted_sweep": (SWEEP, ["--resume", "--name", "halfmade", "--storage", "{tmp}/sweeps"], r"never started its trials"),
    "selector_resume_without_state": ("prance", ["train-selector", "--checkpoint", "{tmp}/micro.safetensors", "--output", "{tmp}/nosel", "--resume"],
                                      r"nothing to resume: no training state .*selector_state\.pt"),
    # --- budget kinds: the sweep's, train-selector's flag, a selector config's
    "sweep_budget_kind": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "budget_kind=median"],
                          r"--set budget_kind: Input should be 'mean' or 'cap'"),
    "selector_budget_kind_flag": ("prance", ["train-selector", "--checkpoint", "{tmp}/micro.safetensors", "--budget-kind", "median"],
                                  r"--budget-kind: invalid choice: 'median'"),
    "selector_budget_kind_set": ("prance", ["train-selector", "--checkpoint", "{tmp}/micro.safetensors", "--set", "budget_kind=p95"],
                                 r"budget_kind: Input should be 'mean' or 'cap'"),
    "selector_budget_kind_config": ("prance", ["train-selector", "--config", "{tmp}/selector_bad_kind.yaml"],
                                    r"selector_bad_kind\.yaml: budget_kind: Input should be 'mean' or 'cap'"),
    "cascade_only_with_cap_budgets": (SWEEP, ["--preset", "tiny", "--set", "checkpoint={tmp}/micro.safetensors", "--set", "selector.decision_blocks=[1,2,3]",
                                              "--set", "strategies=[cascade]", "--set", "budget_kind=cap", "--storage", "{tmp}/sweeps"],
                                      r"no budget x strategy of this sweep can run \(cascade@55%: meets mean budgets only, not cap"),
    # --- the sweep's cascade settings and search-cascade: one rule (prance.cascade.ladder_problem)
    "sweep_cascade_rungs_empty": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.rungs=[]"], r"--set cascade\.rungs: List should have at least 1 item"),
    "sweep_cascade_rung_negative": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.rungs=[0.5,-1]"],
                                    r"--set cascade: cascade: rungs are positive multiples of the budget"),
    "sweep_cascade_rung_twice": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.rungs=[1.0,1.0]"], r"a rung is listed twice"),
    "sweep_cascade_rung_not_number": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.rungs=[0.5,abc]"],
                                      r"cascade\.rungs\.1: Input should be a valid number"),
    "sweep_cascade_unknown_strategy": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.strategies=[tome]"],
                                       r"unknown token strategy 'tome'"),
    "sweep_cascade_strategy_twice": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.strategies=[merge,merge]"],
                                     r"a strategy is listed twice"),
    "sweep_cascade_max_rungs_0": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.max_rungs=0"], r"cascade\.max_rungs: Input should be greater"),
    "sweep_cascade_max_rungs_9": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.max_rungs=9"], r"max_rungs must be in 1\.\.3"),
    "sweep_cascade_margin_not_bool": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.margin=maybe"],
                                      r"cascade\.margin: Input should be a valid boolean"),
    "sweep_cascade_unknown_key": (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--set", "cascade.ladder=3"],
                                  r"--set unknown key 'cascade\.ladder'; allowed keys: rungs, strategies, max_rungs"),
    "search_cascade_max_rungs_0": ("prance", ["search-cascade", "--checkpoint", "{tmp}/micro.safetensors", "--budget", "50%", "--max-rungs", "0"],
                                   r"--max-rungs: max_rungs must be in 1\.\.3"),
    "search_cascade_max_rungs_4": ("prance", ["search-cascade", "--checkpoint", "{tmp}/micro.safetensors", "--budget", "50%", "--max-rungs", "4"],
                                   r"max_rungs must be in 1\.\.3"),
    "search_cascade_max_rungs_text": ("prance", ["search-cascade", "--budget", "50%", "--max-rungs", "three"], r"--max-rungs: invalid int value"),
    "search_cascade_rung_twice": ("prance", ["search-cascade", "--checkpoint", "{tmp}/micro.safetensors", "--budget", "50%", "--rungs", "1,1"],
                                  r"a rung is listed twice"),
    "search_cascade_strategy_twice": ("prance", ["search-cascade", "--checkpoint", "{tmp}/micro.safetensors", "--budget", "50%", "--strategies", "merge,merge"],
                                      r"--strategies lists a strategy twice"),
    # --- eval --config / --sweep
    "eval_config_not_a_configuration": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "merge r=6"],
                                        r"configuration 'merge r=6' is not 'widths=L,L,\.\. STRATEGY"),
    "eval_config_wrong_stages": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0 merge r=2"],
                                 r"widths needs 4 levels in 0\.\.2"),
    "eval_config_unknown_strategy": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 tome r=2"],
                                     r"unknown token strategy 'tome'"),
    "eval_config_bad_parameter": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 merge r=abc"],
                                  r"r must be a number, got 'abc'"),
    "eval_config_parameter_out_of_range": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 merge r=999"],
                                           r"r must be an integer in 0\.\.\d+ for this model, got 999"),
    "eval_latency_images_negative": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 none",
                                                "--latency-images", "-1"], r"--latency-images must be >= 0, got -1"),
    "bench_latency_images_negative": ("prance", ["bench", "--model", MICRO, "--dataset", "random", "--latency-images", "-3"],
                                      r"--latency-images must be >= 0, got -3"),
    "eval_cascade_one_rung": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 none ->"],
                              r"cascade 'widths=0,0,0,0 none ->' is not '<configuration> -> \[p<threshold\]"),
    "eval_cascade_bad_threshold": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config",
                                              "widths=0,0,0,0 none -> [p<abc] widths=1,1,1,1 none"], r"cascade"),
    "eval_cascade_bad_rung": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config",
                                         "widths=0,0,0,0 none -> [p<0.80] widths=9,9,9,9 none"], r"widths"),
    "eval_config_empty": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", ""], r"--config was given an empty value"),
    "eval_config_with_budget": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 merge r=2", "--budget", "50%"],
                                r"name the token strategy and its parameter themselves: drop .*--budget"),
    "eval_sweep_missing": ("prance", ["eval", "--sweep", "nope", "--trial", "0", "--storage", "{tmp}/sweeps"], r"no sweep 'nope' in .*sweeps"),
    "eval_sweep_no_results": ("prance", ["eval", "--sweep", "halfmade", "--trial", "0", "--storage", "{tmp}/sweeps"],
                              r"sweep 'halfmade' has no results\.csv yet"),
    "eval_sweep_missing_trial": ("prance", ["eval", "--sweep", "earlier", "--trial", "7", "--storage", "{tmp}/sweeps"], r"sweep earlier has no trial 7 \(trials 0\.\.0\)"),
    "eval_sweep_missing_budget": ("prance", ["eval", "--sweep", "earlier", "--budget", "99%", "--best", "--storage", "{tmp}/sweeps"],
                                  r"sweep earlier has no budget '99%' \(budgets: 20%\)"),
    "eval_sweep_without_row": ("prance", ["eval", "--sweep", "earlier", "--storage", "{tmp}/sweeps"], r"--sweep needs --trial N, or --budget B --best"),
    "eval_trial_without_sweep": ("prance", ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--trial", "3"], r"--trial picks a sweep row: it needs --sweep"),
    "eval_method_without_best": ("prance", ["eval", "--sweep", "earlier", "--trial", "0", "--method", "static", "--storage", "{tmp}/sweeps"],
                                 r"--method applies to --best only"),
    # --- export
    "export_nothing_chosen": ("prance", ["export", "--output", "{tmp}/exp"], r"export one thing: --config, --sweep"),
    "export_two_chosen": ("prance", ["export", "--config", "widths=0,0,0,0 none", "--selector", "{tmp}/s.safetensors", "--output", "{tmp}/exp"], r"export one thing"),
    "export_output_is_file": ("prance", ["export", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 none", "--output", "{tmp}/a_file"],
                              r"--output .*a_file: is a file, not a folder"),
    "export_output_unwritable": ("prance", ["export", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 none", "--output", "/proc/prance-x"],
                                 r"--output /proc/prance-x is not writable"),
    "export_check_limit_negative": ("prance", ["export", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 none", "--check-limit", "-1",
                                               "--output", "{tmp}/exp"], r"--check-limit must be >= 0, got -1"),
    "export_cascade_malformed": ("prance", ["export", "--checkpoint", "{tmp}/micro.safetensors", "--cascade", "widths=0,0,0,0 none -> widths=2,2,2,2 none",
                                            "--output", "{tmp}/exp"], r"is not '<configuration> -> \[p<threshold\] <configuration>"),
    "export_cascade_threshold": ("prance", ["export", "--checkpoint", "{tmp}/micro.safetensors", "--cascade", "widths=0,0,0,0 none -> [p<2] widths=2,2,2,2 none",
                                            "--output", "{tmp}/exp"], r"a threshold must be in \(0, 1\], got 2"),
    "export_selector_missing": ("prance", ["export", "--selector", "{tmp}/none.safetensors", "--output", "{tmp}/exp"], r"selector checkpoint .*none\.safetensors not found"),
    "export_selector_not_a_selector": ("prance", ["export", "--selector", "{tmp}/micro.safetensors", "--output", "{tmp}/exp"], r"is not a prance selector checkpoint"),
    "export_sweep_missing": ("prance", ["export", "--sweep", "nope", "--trial", "0", "--storage", "{tmp}/sweeps", "--output", "{tmp}/exp"], r"no sweep 'nope'"),
    "export_trial_without_sweep": ("prance", ["export", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 none", "--trial", "3",
                                              "--output", "{tmp}/exp"], r"--trial picks a sweep row: it needs --sweep"),
    "export_budget_with_trial": ("prance", ["export", "--sweep", "earlier", "--trial", "0", "--budget", "20%", "--storage", "{tmp}/sweeps", "--output", "{tmp}/exp"],
                                 r"a --trial row has its own budget: drop --budget"),
    "export_missing_checkpoint": ("prance", ["export", "--checkpoint", "{tmp}/no.safetensors", "--config", "widths=0,0,0,0 none", "--output", "{tmp}/exp"],
                                  r"no\.safetensors"),
    "export_compile_cascade": ("prance", ["export", "--checkpoint", "{tmp}/micro.safetensors", "--cascade", "widths=0,0,0,0 none -> [p<0.5] widths=2,2,2,2 none",
                                          "--compile", "--output", "{tmp}/exp"], r"--compile applies to a static configuration"),
    "export_compile_unknown_backend": ("prance", ["export", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 none", "--no-onnx",
                                                  "--check-limit", "0", "--compile", "no_such_backend", "--output", "{tmp}/exp"],
                                       r"--compile 'no_such_backend': not a torch\.compile backend; use inductor"),
}
if torch.cuda.device_count() == 0:
    CASES["sweep_use_gpu_without_gpu"] = (SWEEP, ["--preset", "tiny", "--storage", "{tmp}/sweeps", "--use-gpu"], r"--use-gpu: a trial needs 1 GPU, this machine has 0")
    CASES["pretrain_use_gpu_without_gpu"] = ("pretrain", ["--preset", "smoke", "--storage", "{tmp}/pt", "--use-gpu"],
                                              r"--use-gpu: \d+ GPU worker\(s\) requested, this machine has 0 GPUs")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_loses_nothing(case: str, files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry, args, match = CASES[case]
    monkeypatch.chdir(files)  # a command's default outputs (runs/...) land in the temp folder
    monkeypatch.delenv("PRANCE_STORAGE", raising=False)
    monkeypatch.delenv("PRANCE_MLFLOW_URI", raising=False)
    before = digest(files)
    code, out, err = run_entry(entry, [a.replace("{tmp}", str(files)) for a in args])
    prog = {"prance": "prance", SWEEP: "budget_sweep", "pretrain": "pretrain"}[entry]
    assert_named_flags_exist(entry, args, assert_one_line(code, out, err, prog, match))
    assert digest(files) == before  # nothing written, nothing removed, nothing changed
    assert not any(p.is_dir() and p.name not in ("images", "sweeps", "earlier", "halfmade", "test", "ants", "bees")
                   for p in files.rglob("*")), sorted(files.rglob("*"))  # no half-made folder either


# ------------------------------------------------------------------ real processes


def test_corrupt_image_in_a_real_process_names_the_file(files: Path) -> None:
    """One line naming the file (it was a 56-line traceback), also through a DataLoader
    worker process, which wraps the error in its own traceback text."""
    proc = run_process("-m", "prance", "eval", "--model", MICRO, "--dataset", f"imagefolder:{files}/images", "--workers", "1", cwd=files)
    assert_one_line(proc.returncode, proc.stdout, proc.stderr, "prance", r"unreadable image .*ants/1\.jpg \(")


@pytest.mark.parametrize("command", [["eval", "--model", MICRO], ["eval", "--checkpoint", "{tmp}/micro.safetensors", "--config", "widths=0,0,0,0 none"],
                                     ["bench", "--model", MICRO, "--strategies", "none", "--batch-size", "6", "--repeats", "1", "--latency-images", "0"]],
                         ids=["eval", "eval_config", "bench"])
def test_skip_bad_images_counts_them(files: Path, command: list[str]) -> None:
    """Every command whose error offers --skip-bad-images takes it (eval --config ignored it)."""
    args = [a.replace("{tmp}", str(files)) for a in command]
    code, out, err = run_entry("prance", [*args, "--dataset", f"imagefolder:{files}/images", "--skip-bad-images", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert "skipping unreadable image" in err and "ants/1.jpg" in err
    if command[0] == "bench":  # one batch of the readable images
        assert "randomly initialised" in err
        return
    assert result["skipped_images"] == 1 and result["n_images"] == 5
    assert ("randomly initialised" in err) == (command[1] == "--model")  # prance_vit_micro has no shipped checkpoint


def test_sweep_refusals_before_ray_print_no_ray_line(files: Path, tmp_path: Path) -> None:
    """``--resume`` of a storage whose only sweep never started: refused before Ray starts,
    so Ray's token-authentication WARNING never comes before the one line."""
    storage = tmp_path / "sweeps"
    (storage / "halfmade").mkdir(parents=True)
    (storage / "halfmade" / "sweep.json").write_text(json.dumps({"name": "halfmade", "created": 1.0, "config": {}}))
    proc = run_process(str(ROOT / "sweeps" / "budget_sweep.py"), "--resume", "--storage", str(storage), cwd=tmp_path)
    assert_one_line(proc.returncode, proc.stdout, proc.stderr, "budget_sweep", r"never started its trials")


def test_untrusted_pickle_refusal_gives_no_unsafe_advice(tmp_path: Path) -> None:
    """torch's message advises reloading with weights_only=False: prance must not repeat it."""
    import builtins

    from prance.models import create_meta

    class Evil:
        def __reduce__(self):
            return (builtins.open, (str(tmp_path / "PWNED"), "w"))

    torch.save({"model": create_meta(MICRO).vit.state_dict(), "x": Evil()}, tmp_path / "evil.pt")
    code, out, err = run_entry("prance", ["flops", "--model", MICRO, "--checkpoint", str(tmp_path / "evil.pt")])
    line = assert_one_line(code, out, err, "prance", r"refusing to load .*evil\.pt")
    assert "weights_only=False" not in line and "if you trust" not in line and "add_safe_globals" not in line, line
    assert not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------- the resume rule


def test_resume_picks_the_latest_sweep_that_started(tmp_path: Path) -> None:
    """A newer sweep that stopped before its trials does not hide an older interrupted one."""
    from prance.sweep import store

    for name, created, started in (("old-interrupted", 1.0, True), ("new-halfmade", 2.0, False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / store.SWEEP_FILE).write_text(json.dumps({"name": name, "created": created}))
        if started:
            (tmp_path / name / store.TUNE_STATE).write_bytes(b"Tune's experiment")
    assert store.latest_sweep(str(tmp_path)) == "old-interrupted"
    store.remove_unstarted(str(tmp_path), "old-interrupted")  # has Tune state: kept
    store.remove_unstarted(str(tmp_path), "new-halfmade")
    assert (tmp_path / "old-interrupted" / store.TUNE_STATE).is_file() and not (tmp_path / "new-halfmade").exists()


# ------------------------------------------------------- what the commands now do


def test_train_selector_shows_progress_with_json_and_resumes(files: Path) -> None:
    """Progress (the warm-start search included) on stderr also with --json; the output
    folder keeps the training state, which --resume continues from."""
    out = files / "selector-run"
    args = ["train-selector", "--checkpoint", str(files / "micro.safetensors"), "--strategy", "merge", "--budget", "60%",
            *[x for kv in ("decision_blocks=[1,2,3]", "hidden=16", "iterations=2", "eval_every=1", "rollout_images=32", "minibatch=16",
                           "ppo_epochs=2", "train_limit=128", "val_limit=64", "static_images=64", "static_first_images=32", "test_limit=64")
               for x in ("--set", kv)], "--output", str(out), "--json"]
    try:
        code, stdout, err = run_entry("prance", args)
        assert code == 0, err
        first = json.loads(stdout)
        assert "[selector] warm start: searching" in err and "[selector] it   2:" in err
        assert (out / "selector.safetensors").is_file() and (out / "selector_state.pt").is_file()
        code, stdout, err = run_entry("prance", [*args, "--resume"])
        assert code == 0, err
        again = json.loads(stdout)
        assert again["top1"] == first["top1"] and again["best_iteration"] == first["best_iteration"]
        assert "warm start: searching" not in err  # continued from the state, not started again
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # the module's fixture folder is compared by the table's cases
