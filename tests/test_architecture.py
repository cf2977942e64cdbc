"""The architecture's contracts: work-directory paths are spelled in one module, and the layers
are one-way (import-linter's contract in pyproject.toml)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import medseg

PACKAGE = Path(medseg.__file__).parent
LAYOUT_MODULE = PACKAGE / "workdir.py"
# a string constant that is (or starts) a work-directory path: "runs", "runs/...", f"fold_{k}",
# "priors", "crossval", "source.json", "model.json"
WORKDIR_LITERAL = re.compile(r"^(runs|priors|crossval)(/.*)?$|^fold_|^(source|model)\.json$")


def _string_constants(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_work_directory_paths_are_spelled_only_in_the_layout_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == LAYOUT_MODULE:
            continue
        for line, value in _string_constants(ast.parse(path.read_text(), str(path))):
            if WORKDIR_LITERAL.match(value.strip()):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {value!r}")
    assert not offenders, "work-directory paths outside medseg/workdir.py:\n" + "\n".join(offenders)


def test_the_literal_check_finds_what_it_looks_for():
    src = 'a = root / "runs" / key / f"fold_{k}"\nb = root / "model.json"\nc = "priors"\nd = "see model.json"'
    found = [v for _, v in _string_constants(ast.parse(src)) if WORKDIR_LITERAL.match(v.strip())]
    assert sorted(found) == ["fold_", "model.json", "priors", "runs"]


def test_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([exe, "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
