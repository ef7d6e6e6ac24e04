"""The packages of torchjd talk to each other through public names only.

A module may import private modules (a path segment starting with ``_``) of its own subpackage,
the private modules at the root of ``torchjd`` (the application pipeline, the protocol, the rules
for the ``.jac`` and ``.grad`` fields...) and the numerical kernels of ``torchjd.linalg``; never
the private modules of another subpackage.
"""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "torchjd"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    package = ["torchjd", *path.relative_to(SOURCE).parent.parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            # `from torchjd.aggregation import _mgda` imports a private module too.
            found.extend((node.lineno, f"{module}.{a.name}") for a in node.names)
    return [(line, name) for line, name in found if name.startswith("torchjd")]


def _violation(importer: Path, imported: str) -> bool:
    parts = imported.split(".")
    private = [i for i, part in enumerate(parts) if part.startswith("_")]
    if not private:
        return False
    first = private[0]
    if first == 1:  # a private module at the root: torchjd._pipeline, torchjd._stateful...
        return False
    if parts[1] == "linalg":
        return False
    own = importer.relative_to(SOURCE).parts
    return len(own) < 2 or own[0] != parts[1]


def _all_violations() -> list[str]:
    violations = []
    for path in sorted(SOURCE.rglob("*.py")):
        for line, name in _imported_modules(path):
            if _violation(path, name):
                violations.append(f"{path.relative_to(SOURCE)}:{line} imports {name}")
    return violations


def test_no_module_imports_the_private_modules_of_another_subpackage() -> None:
    assert _all_violations() == []


@pytest.mark.parametrize(
    ("importer", "imported", "expected"),
    [
        ("grouping/_strategies.py", "torchjd.autojac._engine", True),
        ("grouping/_strategies.py", "torchjd.grouping._grouped_aggregator", False),
        ("autojac/_jac_to_grad.py", "torchjd._pipeline", False),
        ("aggregation/_upgrad.py", "torchjd.linalg._block_pivoting", False),
        ("_pipeline.py", "torchjd.aggregation._bases", True),
        ("_pipeline.py", "torchjd.aggregation", False),
        ("distributed/_exchange.py", "torchjd.aggregation._mgda", True),
    ],
)
def test_the_rule(importer: str, imported: str, expected: bool) -> None:
    assert _violation(SOURCE / importer, imported) is expected
