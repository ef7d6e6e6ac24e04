"""Every Python code block of the README and every docstring example runs."""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import torchjd

_ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _python_blocks(path: Path) -> list[str]:
    return _BLOCK.findall(path.read_text())


def _modules() -> list[str]:
    names = ["torchjd"]
    for info in pkgutil.walk_packages(torchjd.__path__, prefix="torchjd."):
        names.append(info.name)
    return names


def test_readme_has_examples() -> None:
    assert _python_blocks(_ROOT / "README.md")


@pytest.mark.parametrize("index", range(len(_python_blocks(_ROOT / "README.md"))))
def test_readme_block_runs(index: int) -> None:
    code = _python_blocks(_ROOT / "README.md")[index]
    exec(compile(code, f"README.md[block {index}]", "exec"), {"__name__": "__readme__"})


# The integrations with training frameworks import their framework, an optional extra.
_FRAMEWORKS = {
    "torchjd.integrations.lightning": "lightning",
    "torchjd.integrations.transformers": "transformers",
}


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    if name in _FRAMEWORKS:
        pytest.importorskip(_FRAMEWORKS[name])
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
