"""Running a test's worker in several processes that talk through gloo."""

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


def run_processes(
    worker: Callable[..., None], directory: Path, world_size: int = 2, timeout_s: float = 120
) -> list[Any]:
    """Spawn ``worker(rank, world_size, init_file, directory)`` in ``world_size`` processes and
    return what each saved as ``directory/rank{r}.pt``; fail the test past ``timeout_s``."""
    init_file = str(directory / "store")
    context = mp.spawn(
        worker, args=(world_size, init_file, str(directory)), nprocs=world_size, join=False
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"The {world_size} processes did not finish within {timeout_s} s.")
    return [torch.load(Path(directory, f"rank{r}.pt")) for r in range(world_size)]


def init_gloo(rank: int, world_size: int, init_file: str) -> None:
    """Join the gloo process group of a worker (one thread, loopback interface where there is
    one)."""
    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
