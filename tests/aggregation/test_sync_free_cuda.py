"""On a CUDA device, the aggregators whose docstrings declare no host synchronisation run with
``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising call.

Covered: the default UPGrad and DualProj (the projector enumerates free sets for m <= 8;
beyond, block pivoting reads its stopping test on the host, as its docstring says), PCGrad and
GradVac (their random orders are drawn on the CPU and copied through pinned memory without
blocking), and MGDA with two rows (closed form; with more rows Frank–Wolfe checks convergence on
the host, as documented).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from torchjd.aggregation import MGDA, DualProj, GradVac, PCGrad, UPGrad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextmanager
def _syncs_are_errors() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _matrix(m: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(m)
    rows = torch.randn(m, 64, generator=generator) + 0.3 * torch.randn(1, 64, generator=generator)
    return rows.to(dtype=dtype, device="cuda")


_CASES: list[tuple[str, Callable[[], nn.Module], list[int]]] = [
    ("UPGrad", UPGrad, [1, 2, 3, 5, 8]),
    ("DualProj", DualProj, [1, 2, 3, 5, 8]),
    ("PCGrad", PCGrad, [1, 2, 3, 6]),
    ("GradVac", GradVac, [1, 2, 3, 6]),
    ("MGDA", MGDA, [2]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize(("name", "make", "sizes"), _CASES, ids=[c[0] for c in _CASES])
def test_no_host_synchronisation(
    name: str, make: Callable[[], nn.Module], sizes: list[int], dtype: torch.dtype
) -> None:
    for m in sizes:
        aggregator = make()
        matrix = _matrix(m, dtype)
        expected = make()(matrix.cpu().double())  # also warms up (first-call allocations)
        aggregator(matrix)
        torch.cuda.synchronize()
        with _syncs_are_errors():
            for _ in range(2):  # stateful ones: the second call reads the state
                out = aggregator(matrix)
        assert out.device.type == "cuda" and out.dtype == dtype
        if name not in ("PCGrad", "GradVac"):  # random orders: compared in other tests
            tolerance = 1e-2 if dtype == torch.float16 else 1e-4
            torch.testing.assert_close(
                out.double().cpu(), expected, rtol=tolerance, atol=tolerance * expected.abs().max()
            )
