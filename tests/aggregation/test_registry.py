"""Properties shared by every aggregator, parametrised over the registry."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchjd import Stateful
from torchjd.aggregation import Aggregator

from ._matrices import hard_matrices
from ._registry import AGGREGATORS, Entry

_IDS = [entry.id for entry in AGGREGATORS]


def _rows(entry: Entry, wanted: int) -> int:
    if entry.needs_fixed_m is not None:
        return entry.needs_fixed_m
    return max(wanted, entry.min_rows)


def _call(
    entry: Entry, aggregator: Aggregator, matrix: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    torch.manual_seed(seed)
    return aggregator(matrix)


@pytest.fixture(params=AGGREGATORS, ids=_IDS)
def entry(request: pytest.FixtureRequest) -> Entry:
    return request.param


def test_is_aggregator_with_string_forms(entry: Entry) -> None:
    aggregator = entry.make()
    assert isinstance(aggregator, Aggregator)
    assert isinstance(repr(aggregator), str) and repr(aggregator)
    assert isinstance(str(aggregator), str) and str(aggregator)
    assert any(isinstance(module, Stateful) for module in aggregator.modules()) == entry.stateful


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (4, 3), (6, 11)])
def test_shape_dtype_device(entry: Entry, shape: tuple[int, int], dtype: torch.dtype) -> None:
    m, n = _rows(entry, shape[0]), shape[1]
    matrix = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 31 + n), dtype=dtype)
    out = _call(entry, entry.make(), matrix)
    assert out.shape == (n,)
    assert out.dtype == dtype and out.device == matrix.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_finite_on_hard_matrices(entry: Entry, m: int) -> None:
    m = _rows(entry, m)
    for name, matrix in hard_matrices(m).items():
        for dtype in (torch.float64, torch.float32):
            out = _call(entry, entry.make(), matrix.to(dtype))
            assert torch.isfinite(out).all(), f"non-finite output on {name} ({dtype})"


def test_zero_matrix_gives_zero(entry: Entry) -> None:
    m = _rows(entry, 2)
    out = _call(entry, entry.make(), torch.zeros(m, 3))
    assert torch.equal(out, torch.zeros(3))


def test_rejects_non_matrix(entry: Entry) -> None:
    aggregator = entry.make()
    for bad in (torch.ones(()), torch.ones(3), torch.ones(2, 3, 4)):
        with pytest.raises(ValueError, match="matrix"):
            aggregator(bad)


def test_deterministic_under_seed(entry: Entry) -> None:
    m = _rows(entry, 4)
    matrix = torch.randn(m, 6, generator=torch.Generator().manual_seed(3))
    first = _call(entry, entry.make(), matrix, seed=7)
    second = _call(entry, entry.make(), matrix, seed=7)
    assert torch.equal(first, second)


def test_differentiability(entry: Entry) -> None:
    m = _rows(entry, 3)
    matrix = torch.randn(m, 4, generator=torch.Generator().manual_seed(5)).requires_grad_()
    out = _call(entry, entry.make(), matrix)
    assert out.requires_grad == entry.differentiable


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
@pytest.mark.parametrize("entry", [e for e in AGGREGATORS if e.non_conflicting], ids=lambda e: e.id)
def test_non_conflicting(entry: Entry, m: int, n: int, seed: int, scale: float) -> None:
    m = _rows(entry, m)
    matrix = scale * torch.randn(
        m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    out = _call(entry, entry.make(), matrix)
    products = matrix @ out
    # The floor absorbs float64 rounding when the aggregation is essentially zero.
    tolerance = entry.conflict_tol * matrix.norm() * out.norm() + 1e-12 * matrix.norm() ** 2
    assert (products >= -tolerance).all(), products


@pytest.mark.parametrize(
    "entry", [e for e in AGGREGATORS if e.permutation_invariant], ids=lambda e: e.id
)
def test_permutation_invariant(entry: Entry) -> None:
    generator = torch.Generator().manual_seed(11)
    for m in (2, 3, 5):
        m = _rows(entry, m)
        matrix = torch.randn(m, 6, generator=generator, dtype=torch.float64)
        permutation = torch.randperm(m, generator=generator)
        out = _call(entry, entry.make(), matrix)
        permuted = _call(entry, entry.make(), matrix[permutation])
        torch.testing.assert_close(permuted, out, rtol=1e-6, atol=1e-9)


_STATEFUL = [e for e in AGGREGATORS if e.stateful]


def _reset(aggregator: Aggregator) -> None:
    """Reset the aggregator, or the stateful weighting that a plain wrapper holds."""
    if isinstance(aggregator, Stateful):
        aggregator.reset()
        return
    for module in aggregator.modules():
        if isinstance(module, Stateful):
            module.reset()


@pytest.mark.parametrize("entry", _STATEFUL, ids=lambda e: e.id)
def test_reset_restores_fresh_behaviour(entry: Entry) -> None:
    generator = torch.Generator().manual_seed(2)
    m = _rows(entry, 3)
    history = [torch.randn(m, 5, generator=generator) for _ in range(3)]
    probe = torch.randn(m, 5, generator=generator)

    used = entry.make()
    for i, matrix in enumerate(history):
        _call(entry, used, matrix, seed=i)
    _reset(used)
    torch.testing.assert_close(
        _call(entry, used, probe, seed=99), _call(entry, entry.make(), probe, seed=99)
    )


@pytest.mark.parametrize("entry", _STATEFUL, ids=lambda e: e.id)
def test_state_dict_loads_into_fresh_instance(entry: Entry) -> None:
    generator = torch.Generator().manual_seed(4)
    m = _rows(entry, 3)
    history = [torch.randn(m, 5, generator=generator) for _ in range(3)]
    future = [torch.randn(m, 5, generator=generator) for _ in range(3)]

    used = entry.make()
    for i, matrix in enumerate(history):
        _call(entry, used, matrix, seed=i)
    restored = entry.make()
    restored.load_state_dict(used.state_dict())
    for i, matrix in enumerate(future):
        expected = _call(entry, used, matrix, seed=100 + i)
        actual = _call(entry, restored, matrix, seed=100 + i)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
