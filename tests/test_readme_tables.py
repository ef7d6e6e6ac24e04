"""The tables of aggregators (README, the guide to choosing one) agree with what the classes
declare about themselves."""

import re
from pathlib import Path

import pytest

import torchjd.aggregation as aggregation
from tests.aggregation._registry import AGGREGATORS
from torchjd import Stateful
from torchjd.aggregation import Aggregator, Weighting

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "choosing_an_aggregator.md"
_BASES = {"Aggregator", "WeightedAggregator", "GramianWeightedAggregator", "Weighting"}
_CHECK = "✓"


def _rows(path: Path = README, heading: str = "## Aggregators") -> list[dict[str, str]]:
    text = path.read_text()
    table = text.split(heading, 1)[1].split("\n\n", 2)[1]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells)))
    return rows


def _class(cell: str) -> type | None:
    match = re.match(r"`(\w+)`", cell)  # a footnote mark may follow the name
    return None if match is None else getattr(aggregation, match.group(1))


def _instance(cls: type) -> Aggregator:
    """An instance made by the registry (some classes need hyper-parameters)."""
    for entry in AGGREGATORS:
        aggregator = entry.make()
        aggregator = getattr(aggregator, "inner", aggregator)  # the registry's loss-giving wrapper
        if type(aggregator) is cls:
            return aggregator
    raise AssertionError(f"{cls.__name__} has no entry in the registry")


def _weighting_class(row: dict[str, str]) -> type | None:
    weighting = _class(row["weighting"])
    if weighting is not None:
        return weighting
    instance = _instance(_class(row["aggregator"]))  # type: ignore[arg-type]
    if instance.need.value == "matrix":
        return None  # called on the matrix: no weighting is batched for it
    if instance.need.value == "gramian":
        return type(instance.gramian_weighting)  # type: ignore[attr-defined]
    inner = getattr(instance, "weighting", None)
    return type(inner) if isinstance(inner, Weighting) else None


ROWS = _rows()
IDS = [row["aggregator"] if row["aggregator"] != "–" else row["weighting"] for row in ROWS]


def test_every_public_aggregator_and_weighting_has_a_row() -> None:
    listed = {c for row in ROWS for c in (_class(row["aggregator"]), _class(row["weighting"]))}
    public = {
        getattr(aggregation, name)
        for name in aggregation.__all__
        if name not in _BASES
        and isinstance(getattr(aggregation, name), type)
        and issubclass(getattr(aggregation, name), (Aggregator, Weighting))
    }
    assert public - listed == set()


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_stateful_column(row: dict[str, str]) -> None:
    classes = [c for c in (_class(row["aggregator"]), _weighting_class(row)) if c is not None]
    expected = any(issubclass(c, Stateful) for c in classes)
    assert (row["stateful"] == _CHECK) is expected


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_randomised_column(row: dict[str, str]) -> None:
    aggregator = _class(row["aggregator"])
    if aggregator is None:
        expected = _class(row["weighting"]).randomized  # type: ignore[union-attr]
    else:
        expected = _instance(aggregator).randomized
    assert (row["randomised"] == _CHECK) is expected


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_batched_column(row: dict[str, str]) -> None:
    weighting = _weighting_class(row)
    expected = weighting is not None and weighting.batched()
    assert (row["batched over groups"] == _CHECK) is expected


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_paper_column_matches_the_docstring(row: dict[str, str]) -> None:
    links = re.findall(r"\]\((http[^)]+)\)", row["paper"])
    classes = [c for c in (_class(row["aggregator"]), _class(row["weighting"])) if c]
    docs = re.sub(r"\s+", "", " ".join(c.__doc__ or "" for c in classes))
    missing = [link for link in links if link not in docs]
    assert missing == [], f"not in the docstrings of {[c.__name__ for c in classes]}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_non_conflicting_column_matches_the_registry_claims(row: dict[str, str]) -> None:
    aggregator = _class(row["aggregator"])
    claims = [entry.non_conflicting for entry in AGGREGATORS if type(entry.make()) is aggregator]
    if any(claims):
        assert row["non-conflicting"] != ""
    if row["non-conflicting"] == "":
        assert not any(claims)


GUIDE_ROWS = [row for row in _rows(GUIDE, "### Guarantees") if _class(row["aggregator"])]
_INPUTS = {"row count": "$m$ only", "gramian": "$G$", "matrix": "$J$"}


@pytest.mark.parametrize("row", GUIDE_ROWS, ids=[row["aggregator"] for row in GUIDE_ROWS])
def test_the_guide_agrees_with_the_declarations(row: dict[str, str]) -> None:
    aggregator = _instance(_class(row["aggregator"]))  # type: ignore[arg-type]
    assert row["input"].startswith(_INPUTS[aggregator.need.value])
    assert (row["randomised"] == _CHECK) is aggregator.randomized
    stateful = isinstance(aggregator, Stateful) or isinstance(_weighting_of(aggregator), Stateful)
    assert (row["stateful"] == _CHECK) is stateful


def _weighting_of(aggregator: Aggregator) -> object:
    if aggregator.need.value == "gramian":
        return aggregator.gramian_weighting  # type: ignore[attr-defined]
    return getattr(aggregator, "weighting", None)
