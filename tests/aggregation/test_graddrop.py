"""GradDrop: seeded worked examples, the definition with an explicit mask, edge cases."""

import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from torchjd.aggregation import GradDrop

from ._matrices import J_A, J_B, ONE, ZERO, ZR


def _by_definition(
    J: Tensor, f: Callable[[Tensor], Tensor] = lambda p: p, leak: Tensor | None = None
) -> Tensor:
    """Algorithm 1 of the paper with the m x n mask materialised; draws as TorchJD does."""
    m, n = J.shape
    leak = torch.zeros(m, dtype=J.dtype) if leak is None else leak.to(J.dtype)
    purity = 0.5 * (1 + J.sum(dim=0) / J.abs().sum(dim=0))
    F = f(purity)
    U = torch.rand(n, dtype=J.dtype)
    mask = ((F > U) & (J > 0)) | ((F < U) & (J < 0))
    return ((leak.unsqueeze(1) + (1 - leak.unsqueeze(1)) * mask) * J).sum(dim=0)


def _seeded(aggregator: GradDrop, J: Tensor, seed: int) -> Tensor:
    torch.manual_seed(seed)
    return aggregator(J)


@pytest.mark.parametrize(
    ["aggregator", "matrix", "expected"],
    [
        (GradDrop(), J_A, [6.0, 2.0, 2.0]),
        (GradDrop(), J_B, [1.5, -1.0, 3.0, 3.0]),
        (GradDrop(leak=torch.tensor([0.5, 0.0, 1.0])), J_B, [0.5, -0.5, 3.0, 3.0]),
        (GradDrop(f=lambda p: p**2), J_B.double(), [-1.0, -1.0, 3.0, 3.0]),
    ],
)
def test_worked_examples_seed_0(aggregator: GradDrop, matrix: Tensor, expected: list) -> None:
    out = _seeded(aggregator, matrix, 0)
    assert_close(out, torch.tensor(expected, dtype=matrix.dtype))


def test_worked_examples_other_seeds() -> None:
    expected = {0: [-1.0, 2.5, 3.0, 3.0], 1: [1.5, 2.5, 3.0, 3.0], 2: [-1.0, 2.5, 3.0, 3.0]}
    for seed, values in expected.items():
        out = _seeded(GradDrop(), J_B.double(), seed)
        assert_close(out, torch.tensor(values, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (6, 40), (3, 90_000)])
def test_matches_the_definition(shape: tuple[int, int], dtype: torch.dtype) -> None:
    # The last shape spans several chunks of columns.
    generator = torch.Generator().manual_seed(shape[1])
    J = torch.randn(shape, generator=generator, dtype=dtype)
    J[:, ::7] = 0.0  # zero columns: undefined purity, nothing kept
    leak = torch.rand(shape[0], generator=generator)
    for kwargs in ({}, {"leak": leak}, {"f": torch.sqrt}, {"f": lambda p: 1 - p, "leak": leak}):
        out = _seeded(GradDrop(**kwargs), J, 3)
        torch.manual_seed(3)
        expected = _by_definition(J, **kwargs)
        assert_close(out, expected, rtol=1e-6, atol=1e-6 * J.abs().max())


def test_f_sees_the_whole_vector() -> None:
    # f = 1 everywhere keeps every positive entry and no negative one; f must return a vector.
    seen = []

    def f(p: Tensor) -> Tensor:
        seen.append(p.shape)
        return torch.ones_like(p)

    J = torch.randn(4, 90_000, generator=torch.Generator().manual_seed(0))
    assert_close(GradDrop(f=f)(J), J.clamp(min=0.0).sum(dim=0))
    assert seen == [torch.Size([90_000])]


def test_edge_cases() -> None:
    assert torch.equal(GradDrop()(ZERO), torch.zeros(3))
    assert_close(_seeded(GradDrop(), ONE, 0), ONE[0])
    assert_close(_seeded(GradDrop(), ZR, 0), torch.tensor([1.0, 2.0, -1.0]))


def test_empty_inputs_draw_nothing() -> None:
    state = torch.get_rng_state()
    assert torch.equal(GradDrop()(torch.zeros(0, 3)), torch.zeros(3))
    assert GradDrop()(torch.zeros(2, 0)).shape == (0,)
    assert torch.equal(torch.get_rng_state(), state)


def test_one_draw_per_call() -> None:
    torch.manual_seed(0)
    GradDrop()(J_B)
    after = torch.rand(1)
    torch.manual_seed(0)
    torch.rand(4)
    assert torch.equal(torch.rand(1), after)


def test_leak_validation() -> None:
    GradDrop(leak=torch.ones(0))
    with pytest.raises(ValueError, match="`leak`"):
        GradDrop(leak=torch.ones(1, 1))
    aggregator = GradDrop()
    with pytest.raises(ValueError, match="`leak`"):
        aggregator.leak = torch.ones(())
    with pytest.raises(ValueError, match="`leak`"):
        GradDrop(leak=torch.ones(4))(torch.ones(5, 5))
    with pytest.raises(ValueError, match="`leak`"):  # checked before the empty-input shortcut
        GradDrop(leak=torch.ones(4))(torch.ones(5, 0))


def test_dtype_and_no_grad() -> None:
    out = GradDrop(leak=torch.tensor([0.5, 0.5]))(J_A.double())
    assert out.dtype == torch.float64
    J = J_B.clone().requires_grad_()
    assert not GradDrop()(J).requires_grad


def test_repr_and_str() -> None:
    pattern = r"GradDrop\(f=<function _identity at 0x[0-9a-fA-F]+>, leak=None\)"
    assert re.fullmatch(pattern, repr(GradDrop()))
    leak = torch.tensor([0.0, 1.0])
    assert re.fullmatch(
        r"GradDrop\(f=<function _identity at 0x[0-9a-fA-F]+>, leak=tensor\(\[0\., 1\.\]\)\)",
        repr(GradDrop(leak=leak)),
    )
    assert str(GradDrop()) == "GradDrop"
    assert str(GradDrop(leak=leak)) == "GradDrop([0., 1.])"
