"""The Python code blocks of docs/grouping.md run, in order, in one namespace."""

import re
from pathlib import Path

import torch

_PAGE = Path(__file__).resolve().parents[2] / "docs" / "grouping.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks() -> list[tuple[int, str]]:
    """Each block with the line of its first line of code."""
    text = _PAGE.read_text()
    return [(text.count("\n", 0, match.start(1)) + 1, match[1]) for match in _BLOCK.finditer(text)]


def test_the_page_shows_every_strategy() -> None:
    code = "\n".join(block for _, block in _blocks())
    for name in ("together", "per_network", "per_layer", "per_tensor", "GroupedAggregator"):
        assert f"{name}(" in code
    assert len(_blocks()) >= 6


def test_the_blocks_run() -> None:
    namespace: dict[str, object] = {"__name__": "__grouping_docs__"}
    torch.manual_seed(0)
    for line, code in _blocks():
        # Pad so that a traceback shows the line number in the page.
        exec(compile("\n" * (line - 1) + code, str(_PAGE), "exec"), namespace)
