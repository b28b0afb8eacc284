"""The layering rules of docs/architecture.md, stated as import-linter contracts in pyproject.toml
([tool.importlinter]): imports point down only, no import circle, and the forbidden imports of each part.
Imports inside functions count like those at the top of a module (grimp reads every import statement)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "pyproject.toml")
CONTRACTS = 8  # the [[tool.importlinter.contracts]] of pyproject.toml


def lint(src: Path) -> tuple[int, str]:
    """import-linter's `lint-imports` on the package `src`/difftrain (exit status, report). A fresh process, so
    that the package analysed is the one under `src`; no cache (it would be written into the repository)."""
    code = ("import sys, importlinter.api; from importlinter.application.use_cases import lint_imports; "
            f"sys.exit(0 if lint_imports({CONFIG!r}, cache_dir=None, no_logo=True) else 1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=src,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_the_source_keeps_every_layering_contract():
    status, out = lint(ROOT / "src")
    assert status == 0, f"broken layering contracts (docs/architecture.md, pyproject.toml [tool.importlinter]):\n{out}"
    assert re.search(rf"Contracts: {CONTRACTS} kept, 0 broken", out), out


def lint_copy(tmp_path: Path, edit: str, line: str) -> tuple[int, str]:
    """`lint` on a copy of src/difftrain with `line` appended to its file `edit`."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "difftrain", src / "difftrain", ignore=shutil.ignore_patterns("__pycache__"))
    with open(src / "difftrain" / edit, "a") as f:
        f.write("\n" + line + "\n")
    return lint(src)


@pytest.mark.parametrize("edit, line, contract", [
    # inside a function: a model reaching for a sampler
    ("models/layers.py", "def _peek():\n    from difftrain.samplers import SAMPLERS\n    return SAMPLERS", "models know nothing"),
    ("data/digits.py", "import difftrain.training", "imports point down only"),
    ("evaluation/frechet.py", "def _draw():\n    from difftrain import generation\n    return generation",
     "evaluation and report import neither"),
    ("samplers/spec.py", "def _solvers():\n    from difftrain.samplers import ode\n    return ode", "no import circle"),
    ("report/page.py", "def _main():\n    from difftrain.cli import main\n    return main", "nothing imports cli"),
])
def test_a_broken_rule_fails_naming_its_contract(tmp_path, edit, line, contract):
    status, out = lint_copy(tmp_path, edit, line)
    assert status == 1, out
    assert re.search(rf"^{re.escape(contract)}.* BROKEN$", out, re.MULTILINE), out  # its summary line
