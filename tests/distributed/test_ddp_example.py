"""The data-parallel example runs under torchrun with two processes, and the docs show it as is."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

_ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = _ROOT / "examples" / "ddp_training.py"
_PAGE = _ROOT / "docs" / "distributed.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)
def test_the_example_trains_two_identical_replicas_under_torchrun() -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(_SCRIPT),
        "--epochs",
        "2",
    ]
    completed = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    losses = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("epoch")]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert "2 processes ended with identical parameters." in lines


def test_the_docs_page_shows_the_example_as_it_is() -> None:
    assert _SCRIPT.read_text() in _PAGE.read_text()
