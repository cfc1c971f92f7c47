"""results.csv and the printed table say what they hold: integers as integers, a selector
that never beat its static start labelled as that start, identical points and budget
lines of pareto.png marked."""

from __future__ import annotations

import pandas as pd

from prance.sweep import report as rep


def _rows() -> list[dict]:
    return [
        dict(trial_number=0, method="dense", strategy="dense", budget="100%", budget_gflops=2.0, status="finished", top1=90.0, gflops=2.0),
        dict(trial_number=1, method="static", strategy="static", budget="50%", budget_gflops=1.0, status="finished", top1=85.0, gflops=0.9,
             param="widths=1,1,1,1 none"),
        dict(trial_number=2, method="selector", strategy="prune", budget="50%", budget_gflops=1.0, status="finished", top1=85.0, gflops=0.9,
             ppo_epochs=2, rollout_images=128, iteration=20, best_iteration=0, warm_start="widths=1,1,1,1 keep=1,1,1"),
        dict(trial_number=3, method="selector", strategy="merge", budget="50%", budget_gflops=1.0, status="finished", top1=86.0, gflops=0.95,
             ppo_epochs=4, rollout_images=256, iteration=20, best_iteration=10, warm_start="widths=0,1,1,1 keep=1,0.9,1"),
    ]


def test_integers_stay_integers_in_results_csv(tmp_path):
    df = rep.results_frame(_rows(), ["ppo_epochs", "rollout_images"])
    path = tmp_path / "results.csv"
    df.to_csv(path, index=False)
    back = pd.read_csv(path, dtype=str, keep_default_na=False).set_index("trial_number")
    assert back.loc["2", "ppo_epochs"] == "2" and back.loc["3", "rollout_images"] == "256"
    assert back.loc["2", "best_iteration"] == "0" and back.loc["3", "iteration"] == "20"
    assert back.loc["1", "ppo_epochs"] == ""  # not a selector trial: empty, not nan
    assert back.loc["2", "top1"] == "85.0"  # floats stay floats


def test_a_selector_that_never_beat_its_start_is_labelled_as_that_start():
    df = rep.results_frame(_rows(), ["ppo_epochs"])
    lines = {line.split()[1]: line for line in rep.summary_table(df, ["ppo_epochs"]).splitlines()[2:]}
    assert "its static start, PPO never beat it: widths=1,1,1,1 keep=1,1,1" in lines["prune"] and "ppo_epochs" not in lines["prune"]
    assert "ppo_epochs=4" in lines["merge"]


def test_pareto_plot_marks_identical_points_and_labels_budgets(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = rep.results_frame(_rows(), [])
    texts = []
    original = plt.Figure.savefig

    def capture(fig, *a, **k):  # the texts drawn on the real figure, read before it is saved
        texts.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return original(fig, *a, **k)

    plt.Figure.savefig = capture
    try:
        png = rep.plot_pareto(df, tmp_path / "pareto.png", "sweep: Top-1 vs GFLOPs of supernet.safetensors")
    finally:
        plt.Figure.savefig = original
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x2" in texts  # static #1 and selector #2 at the same (0.9, 85.0)
    assert "budget 50%" in texts
