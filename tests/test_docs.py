"""The README and docs say what the commands do: every documented command in their code
blocks (``python -m prance ...``, ``python sweeps/*.py ...``, ``python scripts/*.py ...``)
parses with that entry point's own parser today, the README's eval example reports the
shipped checkpoint's accuracy, and its library snippet runs and prints a GFLOPs figure
within its budget."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import sys
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


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "sweeps" / "README.md"]
# a command: at the start of a line, after `ray job submit ... --` or `&&`, as .venv/bin/python
_ENTRY = re.compile(r"(?:^\s*|--\s+|&&\s+|\.venv/bin/)python (-m prance|(?:sweeps|scripts)/[\w/]+\.py)\b(.*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, entry point, arguments) of every command in the docs' shell code blocks; an
    entry point is ``prance`` or a script's path; the arguments end at a shell operator."""
    found = []
    for doc in DOCS:
        for lang, block in re.findall(r"```(\w*)\n(.*?)```", doc.read_text(), flags=re.S):
            if lang == "python":
                continue
            for line in block.replace("\\\n", " ").splitlines():
                m = _ENTRY.search(line)
                if not m:
                    continue
                args = []
                for token in shlex.split(m.group(2), comments=True):
                    if token in ("&&", "||", "|", ";", ">", "2>", "&"):
                        break
                    args.append(token)
                entry = "prance" if m.group(1) == "-m prance" else m.group(1)
                found.append((f"{doc.relative_to(ROOT)}: {line.strip()[:90]}", entry, args))
    return found


class _Parsed(Exception):
    """Raised once the entry point's parser has read its arguments: nothing runs."""


def parse_only(entry: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The documented arguments read by the entry point's own parser (its ``main``, stopped
    right after ``parse_args``); pytest.fail with argparse's message when they do not parse."""
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, argv=None, namespace=None):
        raise _Parsed(real(self, argv, namespace))

    if entry == "prance":
        from prance.cli import main
    else:
        spec = importlib.util.spec_from_file_location(f"_doc_{Path(entry).stem}", ROOT / entry)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        main = module.main
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [entry, *args])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
        except _Parsed as parsed:
            return parsed.args[0]
        except SystemExit as e:
            pytest.fail(f"{entry} {shlex.join(args)}: {err.getvalue().strip()} (exit {e.code})")
    pytest.fail(f"{entry} never parsed its arguments")


def test_docs_have_commands_of_every_entry_point():
    entries = {entry for _, entry, _ in documented_commands()}
    assert {"prance", "sweeps/budget_sweep.py", "sweeps/pretrain.py", "scripts/compare_methods.py"} <= entries, entries
    assert len(documented_commands()) >= 80


@pytest.mark.parametrize("where,entry,args", documented_commands(), ids=lambda v: v if isinstance(v, str) and ":" in v else "")
def test_every_documented_command_parses(where: str, entry: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each documented command's options exist and take the values shown (a renamed or
    removed flag, a wrong choice, a missing required option fail here)."""
    if entry != "prance":
        assert (ROOT / entry).is_file(), f"{where}: no {entry}"
        if not args:
            return  # a script run without options: that it exists is what the doc says
    parse_only(entry, args, monkeypatch)


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
