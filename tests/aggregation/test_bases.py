import pytest
import torch
from torch import Tensor

from torchjd.aggregation import (
    Aggregator,
    GramianWeightedAggregator,
    Mean,
    MeanWeighting,
    SumWeighting,
    WeightedAggregator,
    Weighting,
)
from torchjd.aggregation._bases import NoGrad
from torchjd.linalg import Matrix, PSDMatrix

from ._matrices import J_A


class _FirstRowWeighting(Weighting[PSDMatrix]):
    """Puts all the weight on the first objective; records the Gramian it saw."""

    def forward(self, stat: Tensor, /) -> Tensor:
        self.seen = stat
        weights = torch.zeros(stat.shape[0], dtype=stat.dtype)
        weights[0] = 1.0
        return weights


def test_abstract_bases() -> None:
    with pytest.raises(TypeError):
        Aggregator()  # type: ignore[abstract]
    with pytest.raises(TypeError):
        Weighting()  # type: ignore[abstract]


def test_aggregator_input_is_positional_only() -> None:
    with pytest.raises(TypeError):
        Mean()(matrix=J_A)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        MeanWeighting()(stat=J_A)  # type: ignore[call-arg]


@pytest.mark.parametrize("shape", [(), (1,), (1, 2, 3), (1, 2, 3, 4)])
def test_rejects_non_matrix(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"dimension 2"):
        Mean()(torch.ones(shape))
    with pytest.raises(ValueError):
        Aggregator._check_is_matrix(torch.ones(shape))
    Aggregator._check_is_matrix(torch.ones(1, 2))


def test_weightings_do_not_validate() -> None:
    torch.testing.assert_close(MeanWeighting()(torch.ones(3)), torch.full((3,), 1 / 3))


def test_weighted_aggregator() -> None:
    aggregator = WeightedAggregator(SumWeighting())
    torch.testing.assert_close(aggregator(J_A), J_A.sum(dim=0))
    assert repr(aggregator) == "WeightedAggregator()" and str(aggregator) == "WeightedAggregator"


def test_gramian_weighted_aggregator_sees_the_gramian() -> None:
    weighting = _FirstRowWeighting()
    aggregator = GramianWeightedAggregator(weighting)
    torch.testing.assert_close(aggregator(J_A), J_A[0])
    torch.testing.assert_close(weighting.seen, J_A @ J_A.T)
    assert aggregator.weighting.weighting is aggregator.gramian_weighting is weighting
    assert repr(aggregator) == "GramianWeightedAggregator()"


def test_gramian_weighting_registered_once() -> None:
    class _WithBuffer(_FirstRowWeighting):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("state", torch.zeros(2))

    keys = list(GramianWeightedAggregator(_WithBuffer()).state_dict())
    assert keys == ["weighting.weighting.state"]


def test_mean_has_no_gramian_weighting() -> None:
    assert not hasattr(Mean(), "gramian_weighting")


def test_forward_hook_replaces_output() -> None:
    aggregator = Mean()
    aggregator.register_forward_hook(lambda _module, _inputs, out: out * 2)
    torch.testing.assert_close(aggregator(J_A), torch.tensor([2.0, 2.0, 2.0]))


def test_composition() -> None:
    composed = MeanWeighting() << (lambda x: x[:2])
    assert isinstance(composed, Weighting)
    torch.testing.assert_close(composed(torch.ones(5, 3)), torch.tensor([0.5, 0.5]))


def test_user_weightings_are_subscriptable() -> None:
    class Uniform(Weighting[Matrix]):
        def forward(self, stat: Tensor, /) -> Tensor:
            return torch.ones(stat.shape[0]) / stat.shape[0]

    torch.testing.assert_close(WeightedAggregator(Uniform())(J_A), torch.ones(3))
    assert issubclass(Matrix, torch.Tensor) and issubclass(PSDMatrix, Matrix)


class _GradModeWeighting(NoGrad, Weighting[PSDMatrix]):
    """Records the grad mode of its forward; raises on a Gramian of one row."""

    def forward(self, stat: Tensor, /) -> Tensor:
        self.grad_enabled = torch.is_grad_enabled()
        if stat.shape[0] == 1:
            raise ValueError("one row")
        return torch.ones(stat.shape[0])


@pytest.mark.parametrize("outer", [True, False])
def test_no_grad_call_restores_the_grad_mode(outer: bool) -> None:
    # NoGrad sets the grad mode itself: disabled inside, the caller's mode after, even on error.
    weighting = _GradModeWeighting()
    with torch.set_grad_enabled(outer):
        weighting(torch.eye(2))
        assert not weighting.grad_enabled
        assert torch.is_grad_enabled() == outer
        with pytest.raises(ValueError, match="one row"):
            weighting(torch.eye(1))
        assert not weighting.grad_enabled
        assert torch.is_grad_enabled() == outer
