"""No function in prance/ runs over 60 lines of body (its docstring not counted): a longer
one is cut into named steps (docs/architecture.md, "Conventions")."""

from __future__ import annotations

import ast
from pathlib import Path

PRANCE = Path(__file__).resolve().parent.parent / "prance"
LIMIT = 60
ALLOWED: dict[str, str] = {}  # "path:function" -> why it cannot be cut (none today)


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's end."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def long_functions(root: Path = PRANCE, limit: int = LIMIT) -> dict[str, int]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > limit:
                out[f"{path.relative_to(root.parent)}:{node.name}"] = body_lines(node)
    return out


def test_body_lines_counts_statements_not_the_docstring():
    fn = ast.parse('def f():\n    """doc\n    more"""\n    a = 1\n\n    return a\n').body[0]
    assert body_lines(fn) == 3


def test_no_function_in_prance_is_over_60_lines():
    found = {k: n for k, n in long_functions().items() if k not in ALLOWED}
    assert not found, f"cut these into named steps (or allow one in ALLOWED with its reason): {found}"
    assert not set(ALLOWED) - set(long_functions()), "ALLOWED names a function that is no longer long"
