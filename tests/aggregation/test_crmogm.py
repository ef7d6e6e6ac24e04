import pytest
import torch
from torch import Tensor

from torchjd import Stateful
from torchjd.aggregation import (
    CRMOGMWeighting,
    GramianWeightedAggregator,
    MeanWeighting,
    MoDoWeighting,
    WeightedAggregator,
    Weighting,
)
from torchjd.linalg._matrix import PSDMatrix

from ._matrices import J_B, J_B2
from ._state_checks import (
    assert_outputs_do_not_alias_the_state,
    assert_reset_restores_fresh_behaviour,
    assert_state_dict_round_trip,
    assert_state_differs_from_fresh,
)

G_B = J_B @ J_B.T
G_B2 = J_B2 @ J_B2.T
_ATOL = {"atol": 1e-4, "rtol": 0}


class _ImpartialWeighting(Weighting[PSDMatrix]):
    """IMTL-G's weights, written from their definition for these tests: ``v = pinv(G) d`` with
    ``d`` the row norms, normalised to sum to one."""

    def forward(self, stat: Tensor, /) -> Tensor:
        v = torch.linalg.pinv(stat) @ torch.sqrt(torch.diagonal(stat))
        return v / v.sum()


class _SoftmaxOfDiagonal(Weighting[PSDMatrix]):
    """A differentiable weighting: softmax of the squared norms."""

    def forward(self, stat: Tensor, /) -> Tensor:
        return torch.softmax(torch.diagonal(stat), dim=0)


def test_inner_weighting_gives_the_spec_imtlg_weights() -> None:
    torch.testing.assert_close(
        _ImpartialWeighting()(G_B), torch.tensor([0.4779, 0.4623, 0.0598]), **_ATOL
    )


def test_spec_examples() -> None:
    aggregator = GramianWeightedAggregator(CRMOGMWeighting(_ImpartialWeighting(), alpha=0.9))
    torch.testing.assert_close(
        aggregator(J_B), torch.tensor([0.6493, 0.4765, 0.5534, 0.5818]), **_ATOL
    )
    torch.testing.assert_close(
        aggregator(J_B2), torch.tensor([0.6074, 0.8844, 0.4862, -0.1660]), **_ATOL
    )
    torch.testing.assert_close(
        aggregator(J_B), torch.tensor([0.6222, 0.4753, 0.5623, 0.6048]), **_ATOL
    )

    weighting = CRMOGMWeighting(_ImpartialWeighting(), alpha=0.9)
    torch.testing.assert_close(weighting(G_B), torch.tensor([0.4779, 0.4623, 0.0598]), **_ATOL)
    torch.testing.assert_close(weighting(G_B2), torch.tensor([0.4697, 0.4532, 0.0771]), **_ATOL)

    initial = torch.tensor([1.0, 0.0, 0.0])
    weighting = CRMOGMWeighting(_ImpartialWeighting(), alpha=0.5, initial_weights=initial)
    torch.testing.assert_close(weighting(G_B), torch.tensor([0.7390, 0.2311, 0.0299]), **_ATOL)
    torch.testing.assert_close(weighting(G_B), torch.tensor([0.6085, 0.3467, 0.0448]), **_ATOL)

    assert WeightedAggregator(CRMOGMWeighting(MeanWeighting()))(torch.zeros(2, 0)).shape == (0,)


def test_moving_average_formula() -> None:
    inner = _ImpartialWeighting()
    weighting = CRMOGMWeighting(inner, alpha=0.9)
    first = weighting(G_B)
    torch.testing.assert_close(first, inner(G_B))
    torch.testing.assert_close(weighting(G_B2), 0.9 * inner(G_B) + 0.1 * inner(G_B2))

    initial = torch.tensor([0.5, 0.3, 0.2])
    weighting = CRMOGMWeighting(inner, alpha=0.5, initial_weights=initial)
    torch.testing.assert_close(weighting(G_B), 0.5 * initial + 0.5 * inner(G_B))


def test_alpha_endpoints() -> None:
    inner = _ImpartialWeighting()
    passthrough = CRMOGMWeighting(inner, alpha=0.0)
    frozen = CRMOGMWeighting(inner, alpha=1.0)
    for stat in (G_B, G_B2, G_B):
        torch.testing.assert_close(passthrough(stat), inner(stat))
        torch.testing.assert_close(frozen(stat), inner(G_B))
    # alpha can be changed between calls
    frozen.alpha = 0.0
    torch.testing.assert_close(frozen(G_B2), inner(G_B2))


def test_validation() -> None:
    for alpha in (1.1, -0.1, float("nan")):
        with pytest.raises(ValueError, match="`alpha`"):
            CRMOGMWeighting(MeanWeighting(), alpha=alpha)
    weighting = CRMOGMWeighting(MeanWeighting())
    with pytest.raises(ValueError, match="`alpha`"):
        weighting.alpha = 2.0
    bad = CRMOGMWeighting(MeanWeighting(), initial_weights=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="initial_weights"):
        bad(torch.ones(3, 3))
    weighting(torch.ones(3, 3))
    with pytest.raises(ValueError, match="number of objectives"):
        weighting(torch.ones(2, 2))


def test_initial_weights_are_cast_and_reused_after_reset() -> None:
    initial = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    weighting = CRMOGMWeighting(MeanWeighting(), alpha=0.5, initial_weights=initial)
    out = weighting(torch.ones(3, 3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([2.0, 0.5, 0.5]) / 3)
    weighting.reset()
    torch.testing.assert_close(weighting(torch.ones(3, 3)), torch.tensor([2.0, 0.5, 0.5]) / 3)


def test_repr() -> None:
    expected = "CRMOGMWeighting(\n  (weighting): MeanWeighting()\n)"
    assert repr(CRMOGMWeighting(MeanWeighting())) == expected
    assert str(CRMOGMWeighting(MeanWeighting())) == expected


def test_differentiability_follows_the_wrapped_weighting() -> None:
    gramian = G_B.clone().requires_grad_()
    weighting = CRMOGMWeighting(_SoftmaxOfDiagonal(), alpha=0.5)
    first = weighting(gramian)
    assert first.requires_grad
    second = weighting(gramian)
    second[0].backward()
    # Only the current call's weights carry gradients (the stored average is detached).
    expected_grad = torch.autograd.grad(0.5 * _SoftmaxOfDiagonal()(gramian)[0], gramian)[0]
    torch.testing.assert_close(gramian.grad, expected_grad)
    assert not CRMOGMWeighting(MoDoWeighting())(G_B.clone().requires_grad_()).requires_grad


def test_reset_also_resets_a_stateful_wrapped_weighting() -> None:
    modo = MoDoWeighting()
    weighting = CRMOGMWeighting(modo, alpha=0.5)
    assert isinstance(weighting, Stateful)
    weighting(G_B)
    weighting(G_B2)
    weighting.reset()
    assert modo._weights.numel() == 0
    fresh = CRMOGMWeighting(MoDoWeighting(), alpha=0.5)
    torch.testing.assert_close(weighting(G_B2), fresh(G_B2), rtol=0, atol=0)


def test_state() -> None:
    def make() -> CRMOGMWeighting:
        return CRMOGMWeighting(MoDoWeighting(), alpha=0.7)

    history = [G_B, G_B2, G_B]
    probes = [G_B2, G_B]
    assert_state_differs_from_fresh(make, history, G_B2)
    assert_reset_restores_fresh_behaviour(make, history, probes)
    assert_state_dict_round_trip(make, history, probes)
    assert_state_dict_round_trip(make, [], probes)

    def make_plain() -> CRMOGMWeighting:
        return CRMOGMWeighting(_ImpartialWeighting(), alpha=0.7)

    assert_state_differs_from_fresh(make_plain, history, G_B2)
    assert_state_dict_round_trip(make_plain, history, probes)
    assert_outputs_do_not_alias_the_state(make_plain, history, G_B2)
    assert_outputs_do_not_alias_the_state(make, history, G_B2)
