"""CPU-side checks of ``scripts/gpu-check.sh`` and ``benchmarks/gpu_check.py``: argument parsing,
the layout of the table, a clean skip without CUDA, and every benchmark case on tiny CPU sizes."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_check", gpu_check)  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def test_default_arguments() -> None:
    args = gpu_check.parse_args([])
    assert args.device == "cuda"
    assert args.repeats == 30
    assert not args.quick and not args.skip_tests and args.output is None


def test_quick_arguments() -> None:
    args = gpu_check.parse_args(["--device", "cpu", "--quick", "--output", "t.md"])
    assert args.device == "cpu" and args.quick and args.repeats == 3
    assert args.output == Path("t.md")


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--device", "tpu"], ["--nope"]])
def test_bad_arguments_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        gpu_check.parse_args(argv)
    assert raised.value.code == 2


def test_table_layout() -> None:
    rows = [gpu_check.Row("UPGradWeighting", "m = 2", 0.12345), gpu_check.Row("x", "y", 2.0, "n")]
    lines = gpu_check.format_table(rows, "Some GPU", "2030-01-02").splitlines()
    assert lines[0] == f"Some GPU, torch {torch.__version__}, 2030-01-02"
    assert lines[1] == ""
    assert lines[2] == "| case | size | median ms | note |"
    assert lines[4] == "| UPGradWeighting | m = 2 | 0.123 |  |"
    assert lines[5] == "| x | y | 2.000 | n |"
    assert all(line.count("|") == 5 for line in lines[2:])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_script_skips_cleanly_without_cuda() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "No CUDA device" in result.stdout


def test_every_case_runs_on_tiny_cpu_sizes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "table.md"
    status = gpu_check.main(
        ["--device", "cpu", "--quick", "--skip-tests", "--repeats", "1", "--output", str(output)]
    )
    table = output.read_text()
    assert status == 0, table
    assert table.strip() == capsys.readouterr().out.strip()
    for case in (
        "UPGradWeighting",
        "GradVacWeighting",
        "NashMTL weighting",
        "MTL step, UPGrad, autocast bfloat16",
        "IWRM MLP, autogram + UPGradWeighting",
        "12-block MLP, GroupedAggregator per tensor",
    ):
        assert f"| {case} |" in table
    assert "failed" not in table
