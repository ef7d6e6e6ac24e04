"""CPU-side checks of ``benchmarks/compare_torchjd.py`` that need no TorchJD: the cases it times,
the table layout and the rewriting of the marked block of ``benchmarks/README.md``."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "compare_torchjd", ROOT / "benchmarks" / "compare_torchjd.py"
)
compare = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("compare_torchjd", compare)
_spec.loader.exec_module(compare)


def test_every_row_of_the_table_and_the_grouping_loop_is_a_case() -> None:
    names = list(compare.cases())
    for row in ("`MGDAWeighting`, m = 2", "`DualProjWeighting`, m = 32", "`IMTLGWeighting`, m = 32",
                "`GradVac()(J)`, m = 2, n = 1e4", "`CAGrad()(J)`, m = 32, n = 1e6",
                "floor `J Jᵀ + wᵀJ`, m = 32, n = 1e6"):  # fmt: skip
        assert row in names
    loops = [n for n in names if n.startswith("12-block")]
    assert len(loops) == 12  # UPGrad and GradVac, m = 2 and 8, whole / per layer / per tensor


def test_table_layout() -> None:
    names = ["a", "12-block MLP step, X, m = 2, whole", "12-block MLP step, X, m = 2, per tensor"]
    ours = {"a": 1.0, names[1]: 10.0, names[2]: 15.0}
    theirs = {"a": 2.0, names[1]: 10.0, names[2]: 30.0}
    table = compare.format_table(names, ours, theirs)
    assert "| a | 2.000 | 1.000 | 0.50 |  |" in table
    assert f"| {names[2]} | 3.00 | 1.50 |" in table


def test_replace_block() -> None:
    text = f"intro\n{compare.BEGIN_MARK}\nold\n{compare.END_MARK}\noutro\n"
    new = compare.replace_block(text, "new table\n")
    assert new == f"intro\n{compare.BEGIN_MARK}\nnew table\n{compare.END_MARK}\noutro\n"
    assert compare.replace_block(new, "again") == new.replace("new table", "again")
    with pytest.raises(ValueError, match="markers"):
        compare.replace_block("no markers", "x")
    with pytest.raises(ValueError, match="after"):
        compare.replace_block(f"{compare.END_MARK} {compare.BEGIN_MARK}", "x")


def test_the_readme_holds_the_block() -> None:
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert compare.replace_block(text, "x").count("x\n" + compare.END_MARK) == 1
