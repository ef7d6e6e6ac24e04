"""The documentation site cannot rot: every Python code block of ``docs/`` runs.

Each Markdown page of ``docs/`` is one test. Its ``python`` code blocks run in order, in one
namespace (a later block may use what an earlier one defined), after ``torch.manual_seed(0)``.
A failure points at the page and the line of the block. A block that needs an optional package
says so on the line just above it:

    <!-- docs-test: requires=lightning -->

and is skipped (with its line in the reason) when that package cannot be imported; nothing else
may be skipped. Inside such a block, a ``FutureWarning`` (from the third-party package) is not
turned into an error. Blocks in other languages are not run, but every fenced block must name one of
the known languages, so that no Python block escapes by a typo, and the ``pip install`` lines of
shell blocks may only name extras that ``pyproject.toml`` defines.

The site itself (cross-references, links between pages, API coverage) is checked by the strict
Sphinx build of ``scripts/docs.sh``.
"""

import importlib
import importlib.util
import pkgutil
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import torchjd
import torchjd.aggregation as aggregation

_ROOT = Path(__file__).resolve().parents[1]
_DOCS = _ROOT / "docs"

_PYTHON = {"python"}
_NOT_RUN = {"bash", "console", "text", "toml"}  # shell sessions, outputs, diagrams, config
# MyST directives whose body is Markdown (it may hold code blocks of its own).
_MARKDOWN_DIRECTIVES = {
    "note",
    "tip",
    "hint",
    "important",
    "warning",
    "caution",
    "attention",
    "danger",
    "error",
    "seealso",
    "admonition",
    "dropdown",
    "topic",
    "sidebar",
}
# MyST directives whose body is not Markdown and holds no code to run.
_OTHER_DIRECTIVES = {"toctree", "math", "figure", "image", "list-table", "csv-table", "table"}
_CODE_DIRECTIVES = {"code-block", "code", "sourcecode"}

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
_RST_CODE = re.compile(r"^\s*(\.\. (code|code-block|sourcecode|doctest|testcode)::|>>>)")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<body>.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    source: str  # the page, relative to the repository
    line: int  # 1-based line of the first line of code
    language: str
    code: str
    requires: tuple[str, ...]


def _parse_marker(text: str, where: str) -> tuple[str, ...]:
    match = _MARKER.match(text.strip())
    if match is None:
        return ()
    key, _, value = match["body"].partition("=")
    if key.strip() != "requires" or not value.strip():
        raise ValueError(
            f"{where}: unknown docs-test marker {text.strip()!r}; only 'requires=...'."
        )
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _blocks(path: Path) -> list[Block]:
    return _parse(path.read_text(), str(path.relative_to(_ROOT)))


def _parse(text: str, source: str) -> list[Block]:
    """The fenced code blocks of a MyST Markdown page, with their language and markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    open_containers: list[tuple[str, int]] = []  # fences of Markdown directives being read
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, info = match["fence"], match["info"]
        if (
            not info
            and open_containers
            and fence[0] == open_containers[-1][0]
            and len(fence) >= open_containers[-1][1]
        ):
            open_containers.pop()
            i += 1
            continue
        where = f"{source}:{i + 1}"
        directive = re.match(r"^\{(?P<name>[a-z-]+)\}\s*(?P<arg>.*)$", info)
        if directive is not None and directive["name"] in _MARKDOWN_DIRECTIVES:
            open_containers.append((fence[0], len(fence)))
            i += 1
            continue
        # A literal block: read up to its closing fence.
        end = i + 1
        while end < len(lines):
            closing = _FENCE.match(lines[end])
            if (
                closing is not None
                and not closing["info"]
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
            ):
                break
            end += 1
        if end == len(lines):
            raise ValueError(f"{where}: code block never closed.")
        body = lines[i + 1 : end]
        first = i + 2
        if directive is not None:
            name, language = directive["name"], directive["arg"].strip()
            if name in _OTHER_DIRECTIVES or name == "eval-rst":
                if name == "eval-rst" and any(_RST_CODE.search(line) for line in body):
                    raise ValueError(f"{where}: write code as a ```python block, not in eval-rst.")
                i = end + 1
                continue
            if name not in _CODE_DIRECTIVES:
                raise ValueError(f"{where}: unknown directive {{{name}}}; add it to this test.")
            while body and body[0].startswith(":"):  # directive options
                body, first = body[1:], first + 1
        else:
            language = info.split()[0] if info else ""
        if language not in _PYTHON | _NOT_RUN:
            raise ValueError(
                f"{where}: code block language {language!r} is not one of "
                f"{sorted(_PYTHON | _NOT_RUN)}; Python code must be tagged 'python' to be run."
            )
        previous = lines[i - 1] if i > 0 else ""
        requires = _parse_marker(previous, where)
        if requires and language not in _PYTHON:
            raise ValueError(f"{where}: a docs-test marker only applies to a python block.")
        indent = len(match["indent"])
        code = "\n".join(line[indent:] if line[:indent].isspace() else line for line in body)
        blocks.append(Block(source, first, language, code + "\n", requires))
        i = end + 1
    if open_containers:
        raise ValueError(f"{source}: a directive is never closed.")
    return blocks


def _pages() -> list[Path]:
    return sorted(p for p in _DOCS.rglob("*.md") if "_build" not in p.parts)


def _page_id(path: Path) -> str:
    return str(path.relative_to(_DOCS))


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


def test_the_docs_have_pages_and_code() -> None:
    pages = _pages()
    assert len(pages) >= 10
    assert sum(b.language == "python" for p in pages for b in _blocks(p)) >= 10


def _run(blocks: list[Block], filename: str) -> list[str]:
    """Run the python blocks in one namespace; return why the skipped ones were skipped."""
    skipped = []
    namespace: dict[str, object] = {"__name__": "__docs__"}
    torch.manual_seed(0)
    for block in blocks:
        if block.language not in _PYTHON:
            continue
        missing = _missing(block.requires)
        if missing:
            skipped.append(f"line {block.line} needs {', '.join(missing)}")
            continue
        # Pad with empty lines so that tracebacks show the line numbers of the page.
        source = "\n" * (block.line - 1) + block.code
        with warnings.catch_warnings():
            if block.requires:
                # The deprecations inside a third-party integration are not ours to fix.
                warnings.filterwarnings("ignore", category=FutureWarning)
            exec(compile(source, filename, "exec"), namespace)
    return skipped


@pytest.mark.parametrize("page", _pages(), ids=_page_id)
def test_page_code_blocks_run(page: Path) -> None:
    skipped = _run(_blocks(page), str(page))
    if skipped:
        pytest.skip(f"{_page_id(page)}: {'; '.join(skipped)} (not installed)")


def _extras() -> set[str]:
    """The extras of pyproject.toml (read without tomllib, which Python 3.10 lacks)."""
    text = (_ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_\-]+)\s*=", section, flags=re.MULTILINE))


@pytest.mark.parametrize("page", _pages(), ids=_page_id)
def test_install_commands_name_existing_extras(page: Path) -> None:
    extras = _extras()
    for block in _blocks(page):
        if block.language not in {"bash", "console"}:
            continue
        for offset, line in enumerate(block.code.splitlines()):
            if "pip install" not in line:
                continue
            assert not re.search(r"pip install[^#]*\btorchjd\b(?!\[)", line.replace(".[", "[")), (
                f"{page}:{block.line + offset}: install torchjd from the repository, "
                "never by name from the package index"
            )
            for group in re.findall(r"\[([A-Za-z0-9_,\- ]+)\]", line.split("#")[0]):
                for extra in group.split(","):
                    assert extra.strip() in extras, (
                        f"{page}:{block.line + offset}: extra {extra.strip()!r} is not defined "
                        f"in pyproject.toml ({sorted(extras)})"
                    )


def _public_packages() -> list[str]:
    return [
        f"torchjd.{info.name}"
        for info in pkgutil.iter_modules(torchjd.__path__)
        if not info.name.startswith("_")
    ]


@pytest.mark.parametrize("package", ["torchjd", *_public_packages()])
def test_every_public_package_has_an_api_page(package: str) -> None:
    page = _DOCS / "api" / f"{package.rpartition('.')[2]}.rst"
    assert page.exists(), f"no API page {page.relative_to(_ROOT)} for {package}"
    assert f".. automodule:: {package}\n" in page.read_text()


# --- The "choosing an aggregator" table agrees with the code ---------------------------------

_TABLE_PAGE = _DOCS / "choosing_an_aggregator.md"
_BASES = {"Aggregator", "Weighting", "WeightedAggregator", "GramianWeightedAggregator"}


def _tables() -> list[list[dict[str, str]]]:
    """The Markdown tables of the page, each a list of rows keyed by the header's names."""
    tables: list[list[str]] = []
    previous_is_table = False
    for line in _TABLE_PAGE.read_text().splitlines():
        is_table = line.startswith("|")
        if is_table and not previous_is_table:
            tables.append([])
        if is_table:
            tables[-1].append(line)
        previous_is_table = is_table
    parsed = []
    for lines in tables:
        header = [cell.strip().lower() for cell in lines[0].strip("|").split("|")]
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
        assert all(len(cells) == len(header) for cells in rows), lines[0]
        parsed.append([dict(zip(header, cells)) for cells in rows])
    return parsed


def _names(cell: str) -> list[str]:
    return re.findall(r"`([A-Za-z]+)`", cell)


def _table_rows() -> list[dict[str, str]]:
    """The table of guarantees: the first of the page."""
    return _tables()[0]


def test_choosing_table_lists_every_aggregator_and_weighting() -> None:
    listed = [n for row in _table_rows() for n in _names(row["aggregator"] + row["weighting"])]
    public = {
        name
        for name in aggregation.__all__
        if isinstance(getattr(aggregation, name), type) and name not in _BASES
    }
    assert sorted(listed) == sorted(public)


def test_choosing_cost_table_has_one_row_per_row_of_the_guarantees() -> None:
    guarantees = [_names(row["aggregator"]) or _names(row["weighting"]) for row in _table_rows()]
    costs = [_names(row["aggregator"]) for row in _tables()[1]]
    assert costs == guarantees
    assert all(row["cost as m and n grow"] for row in _tables()[1])


def test_choosing_table_stateful_and_randomised_columns_are_true() -> None:
    from tests.aggregation._registry import AGGREGATORS

    randomised = {type(entry.make()).__name__ for entry in AGGREGATORS if entry.randomised}
    for row in _table_rows():
        names = _names(row["aggregator"] + row["weighting"])
        classes = [getattr(aggregation, name) for name in names]
        is_stateful = [issubclass(cls, torchjd.Stateful) for cls in classes]
        assert all(is_stateful) == ("✓" in row["stateful"]) == any(is_stateful), names
        if _names(row["aggregator"]) and _names(row["aggregator"])[0] in {
            type(e.make()).__name__ for e in AGGREGATORS
        }:
            assert (_names(row["aggregator"])[0] in randomised) == ("✓" in row["randomised"]), names


# --- The collector itself ---------------------------------------------------------------------

_SAMPLE = """# Title

```python
x = 1
```

:::{note}
Not a fence.
:::

````{note}
Inside a note:

  ```python
  y = x + 1
  ```
````

<!-- docs-test: requires=a_module_that_does_not_exist -->
```python
import a_module_that_does_not_exist
```

```{code-block} python
:caption: a directive with an option
z = y * 10
```

```bash
pip install -e .
```
"""


def test_collector_finds_every_block_with_its_line_and_markers() -> None:
    blocks = _parse(_SAMPLE, "sample.md")
    assert [(b.line, b.language) for b in blocks] == [
        (4, "python"),
        (15, "python"),
        (21, "python"),
        (26, "python"),
        (30, "bash"),
    ]
    assert blocks[1].code == "y = x + 1\n"  # the indentation of the fence is removed
    assert blocks[2].requires == ("a_module_that_does_not_exist",)
    assert blocks[3].code == "z = y * 10\n"  # the directive's options are not code


def test_collector_runs_blocks_in_one_namespace_and_skips_only_marked_ones() -> None:
    skipped = _run(_parse(_SAMPLE, "sample.md"), "sample.md")
    assert skipped == ["line 21 needs a_module_that_does_not_exist"]


def test_collector_reports_the_line_of_a_failing_block() -> None:
    text = "# Page\n\n```python\nvalue = 1\nassert value == 2\n```\n"
    with pytest.raises(AssertionError) as info:
        _run(_parse(text, "page.md"), "page.md")
    frame = info.traceback[-1]
    assert (str(frame.path), frame.lineno + 1) == ("page.md", 5)


@pytest.mark.parametrize(
    "text",
    [
        "```py\nx = 1\n```\n",  # an unknown language: the block would silently not run
        "```\nx = 1\n```\n",  # no language
        "```python\nx = 1\n",  # never closed
        "<!-- docs-test: skip -->\n```python\nx = 1\n```\n",  # only requires= is allowed
        "```{eval-rst}\n.. code-block:: python\n\n   x = 1\n```\n",  # code hidden in reST
    ],
)
def test_collector_rejects_blocks_that_would_escape(text: str) -> None:
    with pytest.raises(ValueError):
        _parse(text, "page.md")
