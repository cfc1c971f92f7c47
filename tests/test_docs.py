"""The README says what the commands do: every ``python -m prance`` line in its code blocks
parses with today's options, the eval example reports the shipped checkpoint's accuracy,
and the library snippet runs and prints a GFLOPs figure within its budget."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _prance_commands() -> list[str]:
    text = "\n".join(_code_blocks("bash")).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith("python -m prance ")]


def test_readme_has_prance_commands():
    assert len(_prance_commands()) >= 8


@pytest.mark.parametrize("command", _prance_commands())
def test_every_readme_command_parses(command: str) -> None:
    from prance.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(shlex.split(command)[3:])
        except SystemExit as e:
            pytest.fail(f"{command!r}: {err.getvalue().strip()} (exit {e.code})")


def test_readme_eval_example_uses_the_shipped_checkpoint() -> None:
    """It reported 9.96% (random weights) when eval defaulted to an untrained model."""
    from prance.cli import main

    line = next(c for c in _prance_commands() if c.startswith("python -m prance eval --model prance_vit_fmnist"))
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*shlex.split(line)[3:], "--limit", "300"])  # the example, on 300 of its images
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err.getvalue()
    import json

    result = json.loads(out.getvalue())
    assert result["checkpoint"].endswith("checkpoints/prance_vit_fmnist.safetensors")
    assert result["top1"] > 70.0, result  # random weights: ~10%
    assert "randomly initialised" not in err.getvalue()


def test_readme_library_snippet_runs_and_meets_its_budget(capsys: pytest.CaptureFixture) -> None:
    block = next(b for b in _code_blocks("python") if "calibrate(" in b)
    assert "subnet=sub" in block
    exec(compile(block.replace("torch.randn(8,", "torch.randn(1,"), "README.md", "exec"), {})  # one image is enough here
    printed = capsys.readouterr().out
    gflops = float(re.search(r"([\d.]+) GFLOPs", printed).group(1))
    assert 2.0 < gflops <= 2.3, printed
