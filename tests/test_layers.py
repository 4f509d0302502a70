"""The package's layers point one way: models/ imports nothing of thuglm above it, data/ nothing but models/,
inference/ nothing of training/ (training/ may use inference/'s k-bit loading and the demo's chat).

models/ -> data/ -> training/, inference/ -> cli.py. A cycle (models importing inference's prompt helpers, which
imported the models) once only worked because a package loaded its modules lazily.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "thuglm"
ABOVE = {"models": {"data", "training", "inference", "cli"}, "data": {"training", "inference", "cli"},
         "inference": {"training", "cli"}}


def thuglm_imports(path: Path) -> set[str]:
    """The first component under `thuglm` of every module `path` imports (relative imports resolved)."""
    layer_depth = len(path.relative_to(PACKAGE).parts) - 1  # 1 for models/x.py, 2 for data/formats/x.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = list(path.relative_to(PACKAGE).parts[:-1])[: layer_depth - node.level + 1]
                module = ".".join(["thuglm", *parts, *(node.module.split(".") if node.module else [])])
            else:
                module = node.module or ""
            names = [module] if node.module or not node.level else [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "thuglm" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_a_layer_imports_nothing_above_it(layer):
    offenders = {str(path.relative_to(PACKAGE)): sorted(thuglm_imports(path) & ABOVE[layer])
                 for path in sorted((PACKAGE / layer).rglob("*.py"))}
    assert not {name: bad for name, bad in offenders.items() if bad}


def test_the_check_sees_relative_imports(tmp_path):
    assert thuglm_imports(PACKAGE / "inference" / "chat.py") == {"models"}


def private_imports(path: Path) -> list[str]:
    """`from X import _name` where X is a thuglm module: a name its module keeps to itself, used elsewhere."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("thuglm")):
            found += [f"{'.' * node.level}{node.module or ''}.{alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names():
    """What modules share is public, with a docstring; a leading underscore means "only this module uses it"."""
    offenders = {str(path.relative_to(PACKAGE)): private_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}
    assert not {name: names for name, names in offenders.items() if names}


def test_the_private_check_sees_relative_and_absolute_imports_but_not_other_libraries(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("from .processing import _IDS, layout_ids\nfrom thuglm.data.sources import _normalize\n"
                      "from datasets.features.features import _visit\nfrom . import __version__\n", encoding="utf-8")
    assert private_imports(module) == [".processing._IDS", "thuglm.data.sources._normalize"]
