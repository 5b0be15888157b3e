"""Lines per function of a module (the issue-16 measure of the readable loop): ``python benchmarks/function_lengths.py src/sipo/train.py``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def lengths(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(node.name, node.end_lineno - node.lineno + 1) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))]


if __name__ == "__main__":
    for name, count in lengths(Path(sys.argv[1])):
        print(f"{count:5d}  {name}")
