"""Layout budget: flag modules and functions that have grown past their line limits.

Walks the package sources (``edgetune/``, ``kernels/``, ``server/``; never ``tests/`` or
``bench/``) and prints one line per finding, in the compiler style editors jump to::

    edgetune/measure/profile.py:1: module is 494 lines (max 450)
    server/rounds.py:120: function RoundBook.close is 72 lines (max 60)

A function is measured from its ``def`` line (decorators excluded) to its last line; methods
and nested functions are named by their dotted path. Exit status 1 when anything is over.

    python tools/check_layout.py [--max-module-lines N] [--max-function-lines N] [PATH ...]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("edgetune", "kernels", "server")
SKIP_DIRS = {"tests", "bench", "__pycache__"}
Function = ast.FunctionDef | ast.AsyncFunctionDef


def python_files(paths: Sequence[Path]) -> Iterator[Path]:
    """Every ``.py`` file under ``paths`` (files are taken as given), skipping test/bench dirs."""
    for path in paths:
        if path.is_file():
            yield path
            continue
        for file in sorted(path.rglob("*.py")):
            if not SKIP_DIRS.intersection(file.relative_to(path).parts[:-1]):
                yield file


def functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    """``(dotted name, def)`` for every function and method below ``node``, nested ones too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from functions(child, f"{name}.")
        else:
            yield from functions(child, prefix)


def check_file(path: Path, max_module: int, max_function: int) -> list[str]:
    """The findings for one file, as ``path:line: message`` lines."""
    text = path.read_text(encoding="utf-8")
    try:
        shown = path.resolve().relative_to(ROOT)
    except ValueError:
        shown = path
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as err:
        return [f"{shown}:{err.lineno or 1}: syntax error: {err.msg}"]
    findings = []
    lines = len(text.splitlines())
    if lines > max_module:
        findings.append(f"{shown}:1: module is {lines} lines (max {max_module})")
    for name, node in functions(tree):
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        if length > max_function:
            findings.append(
                f"{shown}:{node.lineno}: function {name} is {length} lines (max {max_function})"
            )
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-module-lines", type=int, default=450, metavar="N")
    parser.add_argument("--max-function-lines", type=int, default=60, metavar="N")
    parser.add_argument("paths", nargs="*", type=Path, help="files or folders (default: sources)")
    args = parser.parse_args(argv)
    paths = args.paths or [ROOT / name for name in SOURCES]
    findings = [
        line
        for file in python_files(paths)
        for line in check_file(file, args.max_module_lines, args.max_function_lines)
    ]
    for line in findings:
        print(line)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
