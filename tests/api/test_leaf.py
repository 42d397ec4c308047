"""loraplex_api is the leaf of the import graph: the operator and the trainer import it, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[2] / "api" / "loraplex_api"
ABOVE = ("loraplex_operator", "loraplex_trainer", "loraplex_cli")


def imported_modules(path: Path) -> list[str]:
    """Every absolute module a file imports, at any depth (lazy imports inside functions too)."""
    modules: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
    return modules


@pytest.mark.parametrize("path", sorted(API.rglob("*.py")), ids=lambda p: p.name)
def test_loraplex_api_imports_nothing_above_it(path: Path) -> None:
    above = [m for m in imported_modules(path) if m.split(".")[0] in ABOVE]
    assert not above, f"{path.relative_to(API.parent)} imports {', '.join(above)}"


def test_the_walk_sees_lazy_imports(tmp_path: Path) -> None:
    # The check must catch the import a lazy subcommand would make, not only module-level ones.
    probe = tmp_path / "probe.py"
    probe.write_text("import json\n\ndef f():\n    from loraplex_trainer.standalone import train\n")
    assert imported_modules(probe) == ["json", "loraplex_trainer.standalone"]
