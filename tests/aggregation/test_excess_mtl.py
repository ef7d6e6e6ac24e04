import math
import warnings

import pytest
import torch

from torchjd import Stateful
from torchjd.aggregation import ExcessMTL, ExcessMTLWeighting

from ._matrices import J_A, J_B, J_B2, ONE, ZERO, ZR
from ._state_checks import (
    assert_outputs_do_not_alias_the_state,
    assert_reset_restores_fresh_behaviour,
    assert_state_dict_round_trip,
    assert_state_differs_from_fresh,
)

_ATOL = {"atol": 1e-4, "rtol": 0}
J1 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
J2 = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)


def _risks(square_sum: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return (matrix**2 / torch.sqrt(square_sum + 1e-7)).sum(dim=1)


def test_first_call_is_a_softmax_of_the_l1_norms() -> None:
    # S = Q, so r_i = sum_j |J_ij|^2 / sqrt(|J_ij|^2 + 1e-7) ~ ||g_i||_1: [2, 1] -> [e^2, e] / sum.
    weighting = ExcessMTLWeighting()
    expected = torch.tensor([math.e**2, math.e], dtype=torch.float64)
    torch.testing.assert_close(weighting(J1), expected / expected.sum(), **_ATOL)
    # Second call: S = [[5, 0], [5, 0]], r = [1/sqrt(5), 4/sqrt(5)] (up to 1e-7), divided by the
    # baseline b = first r = [2, 1]: q ~ q_prev * exp([1 / (2 sqrt(5)), 4 / sqrt(5)]).
    previous = expected / expected.sum()
    updated = previous * torch.exp(torch.tensor([1 / (2 * math.sqrt(5)), 4 / math.sqrt(5)]))
    torch.testing.assert_close(weighting(J2), (updated / updated.sum()).double(), **_ATOL)


def test_exact_formula_over_calls() -> None:
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    eta = 0.7
    weighting = ExcessMTLWeighting(robust_step_size=eta)
    square_sum = torch.zeros(3, 5, dtype=torch.float64)
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    baseline = None
    for matrix in matrices:
        square_sum = square_sum + matrix**2
        r = _risks(square_sum, matrix)
        if baseline is None:
            baseline = r
        else:
            r = r / (baseline + 1e-7)
        q = torch.softmax(torch.log(q) + eta * r, dim=0)
        torch.testing.assert_close(weighting(matrix), q)


def test_spec_examples() -> None:
    aggregator = ExcessMTL()
    torch.testing.assert_close(aggregator(J_A), torch.tensor([4.8080, 1.0, 1.0]), **_ATOL)
    torch.testing.assert_close(aggregator(J_A), torch.tensor([4.8080, 1.0, 1.0]), **_ATOL)
    torch.testing.assert_close(ExcessMTLWeighting()(J_A), torch.tensor([0.1192, 0.8808]), **_ATOL)

    aggregator = ExcessMTL()
    torch.testing.assert_close(
        aggregator(J_B), torch.tensor([0.0409, 0.7264, 0.4654, 1.1510]), **_ATOL
    )
    torch.testing.assert_close(
        aggregator(J_B2), torch.tensor([1.0955, 0.4395, 0.2081, 0.2696]), **_ATOL
    )
    torch.testing.assert_close(
        aggregator(J_B), torch.tensor([0.0804, 0.6092, 0.5769, 1.0947]), **_ATOL
    )
    weighting = ExcessMTLWeighting()
    torch.testing.assert_close(weighting(J_B), torch.tensor([0.2327, 0.3837, 0.3837]), **_ATOL)
    torch.testing.assert_close(weighting(J_B2), torch.tensor([0.2781, 0.3482, 0.3736]), **_ATOL)

    aggregator = ExcessMTL(n_warmup_steps=1)
    torch.testing.assert_close(aggregator(J_B), torch.tensor([1 / 6, 0.5, 2 / 3, 1.0]))
    torch.testing.assert_close(
        aggregator(J_B2), torch.tensor([0.9280, 0.5252, 0.4820, 0.0755]), **_ATOL
    )


def test_same_matrix_keeps_the_weights_constant() -> None:
    weighting = ExcessMTLWeighting()
    first = weighting(J_B)
    for _ in range(3):
        torch.testing.assert_close(weighting(J_B), first, **_ATOL)


def test_warm_up() -> None:
    weighting = ExcessMTLWeighting(n_warmup_steps=5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        assert torch.equal(
            weighting(torch.randn(3, 4, generator=generator)), torch.full((3,), 1 / 3)
        )

    # Conformance check: warm-up of 2, then r_3 / (b + 1e-7) with b = (r_1 + r_2) / 2.
    weighting = ExcessMTLWeighting(n_warmup_steps=2)
    torch.testing.assert_close(weighting(J1), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(weighting(J2), torch.full((2,), 0.5, dtype=torch.float64))
    r1 = _risks(J1**2, J1)
    r2 = _risks(J1**2 + J2**2, J2)
    r3 = _risks(2 * J1**2 + J2**2, J1)
    expected = torch.softmax(torch.log(torch.full((2,), 0.5)) + r3 / ((r1 + r2) / 2 + 1e-7), dim=0)
    torch.testing.assert_close(weighting(J1), expected.double())
    torch.testing.assert_close(
        expected, torch.tensor([0.6893, 0.3107], dtype=torch.float64), **_ATOL
    )


def test_edge_cases() -> None:
    torch.testing.assert_close(ExcessMTL()(ONE), ONE[0])
    torch.testing.assert_close(ExcessMTL()(ZERO), torch.zeros(3))
    torch.testing.assert_close(ExcessMTL()(ZR), torch.tensor([0.9820, 1.9640, -0.9820]), **_ATOL)
    assert ExcessMTL()(torch.zeros(2, 0)).shape == (0,)
    with pytest.raises(ValueError, match="at least one objective"):
        ExcessMTL()(torch.zeros(0, 3))
    # A huge risk saturates to one-hot weights instead of overflowing.
    out = ExcessMTLWeighting(robust_step_size=1e30)(torch.tensor([[2.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]))
    for scale in (1e-8, 1e8):
        for dtype in (torch.float32, torch.float64):
            assert torch.isfinite(ExcessMTL()((scale * J_B).to(dtype))).all()


def test_validation() -> None:
    for kwargs in (
        {"robust_step_size": 0.0},
        {"robust_step_size": -1.0},
        {"n_warmup_steps": -1},
        {"n_warmup_steps": 1.5},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ExcessMTL(**kwargs)
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ExcessMTLWeighting(**kwargs)
    aggregator = ExcessMTL()
    with pytest.raises(ValueError, match="robust_step_size"):
        aggregator.robust_step_size = 0.0
    aggregator.n_warmup_steps = 3
    assert aggregator.weighting.n_warmup_steps == 3


def test_repr_and_str() -> None:
    aggregator = ExcessMTL(robust_step_size=2.0, n_warmup_steps=3)
    assert repr(aggregator) == "ExcessMTL(robust_step_size=2.0, n_warmup_steps=3)"
    assert str(aggregator) == "ExcessMTL"
    expected = "ExcessMTLWeighting(robust_step_size=1.0, n_warmup_steps=0)"
    assert repr(ExcessMTLWeighting()) == expected and str(ExcessMTLWeighting()) == expected


def test_no_grad() -> None:
    matrix = J_B.clone().requires_grad_()
    assert not ExcessMTL()(matrix).requires_grad
    assert not ExcessMTLWeighting()(matrix).requires_grad


@pytest.mark.parametrize("n_warmup_steps", [0, 2])
def test_state(n_warmup_steps: int) -> None:
    assert isinstance(ExcessMTL(), Stateful) and isinstance(ExcessMTLWeighting(), Stateful)

    def make() -> ExcessMTL:
        return ExcessMTL(n_warmup_steps=n_warmup_steps)

    history = [J_B, J_B2, J_B]
    probes = [J_B2, J_B, J_B2]
    assert_state_differs_from_fresh(make, history, J_B2)
    assert_reset_restores_fresh_behaviour(make, history, probes)
    # During the warm-up, at its end, and after.
    for n_history in range(4):
        assert_state_dict_round_trip(make, history[:n_history], probes)
    assert_outputs_do_not_alias_the_state(
        lambda: ExcessMTLWeighting(n_warmup_steps=n_warmup_steps), history, J_B2
    )


def test_reinitialises_when_the_shape_or_dtype_changes() -> None:
    aggregator = ExcessMTL()
    aggregator(J_B)
    aggregator(J_B2)
    with pytest.warns(UserWarning, match="re-initialises"):
        out = aggregator(J_A)
    torch.testing.assert_close(out, ExcessMTL()(J_A))
    with pytest.warns(UserWarning, match="re-initialises"):
        out = aggregator(J_A.double())
    torch.testing.assert_close(out, ExcessMTL()(J_A.double()))
    with pytest.warns(UserWarning, match="re-initialises"):
        out = aggregator(J_A.double()[:, :2])
    torch.testing.assert_close(out, ExcessMTL()(J_A.double()[:, :2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExcessMTL()(J_A)
