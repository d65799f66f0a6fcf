"""Every third-party package the library imports is declared in pyproject.toml.

Module-level imports outside ``training/`` run on ``import music2latent2...`` and must be core
dependencies; imports inside functions (optional features) must be declared in some extra.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"visqol": "visqol-python", "huggingface_hub": "huggingface-hub"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imports(path: Path):
    """(top-level package, at module level?) for each absolute import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_level = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module_level.add(id(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "music2latent2":
                yield top, id(node) in module_level


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    seen = set()
    for path in sorted((ROOT / "music2latent2").rglob("*.py")):
        optional_part = "training" in path.relative_to(ROOT / "music2latent2").parts
        for top, module_level in _imports(path):
            dist = DISTRIBUTION.get(top, top).lower().replace("_", "-")
            seen.add(dist)
            where = f"{path.relative_to(ROOT)} imports {top}"
            if module_level and not optional_part:
                assert dist in core, f"{where} at module level, but {dist} is not in [project] dependencies"
            else:
                assert dist in core | extras, f"{where}, but {dist} is declared nowhere in pyproject.toml"
    assert {"torch", "numpy", "tqdm", "matplotlib"} <= seen  # the scan found the imports it should
