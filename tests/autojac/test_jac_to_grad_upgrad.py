"""``jac_to_grad`` with UPGrad: the worked values of the spec and the monitoring hooks."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from torchjd._pipeline import choose_route as _choose_route
from torchjd._protocol import Need as _Route
from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad


def _param_with_jac(rows: list[list[float]]) -> Tensor:
    p = torch.zeros(len(rows[0]), requires_grad=True)
    p.jac = torch.tensor(rows)
    return p


@pytest.mark.parametrize("optimize", [False, True])
def test_non_conflicting_rows(optimize: bool) -> None:
    p = _param_with_jac([[1.0, 1.0], [2.0, 1.0]])
    weights = jac_to_grad([p], UPGrad(), optimize_gramian_computation=optimize)
    assert_close(weights, torch.tensor([0.5, 0.5]))
    assert_close(p.grad, torch.tensor([1.5, 1.0]))


@pytest.mark.parametrize("optimize", [False, True])
def test_conflicting_rows(optimize: bool) -> None:
    p = _param_with_jac([[1.0, 0.0], [-1.0, 1.0]])
    weights = jac_to_grad([p], UPGrad(), optimize_gramian_computation=optimize)
    # ≈ because of reg_eps: the exact values are 1 and 0.75
    assert_close(weights, torch.tensor([1.0, 0.75]), atol=2e-4, rtol=0)
    assert_close(p.grad, torch.tensor([0.25, 0.75]), atol=2e-4, rtol=0)
    assert p.grad @ torch.tensor([1.0, 0.0]) >= 0 and p.grad @ torch.tensor([-1.0, 1.0]) >= 0


def test_upgrad_takes_the_gramian_route() -> None:
    assert _choose_route(UPGrad(), False) is _Route.GRAMIAN


def test_same_result_with_and_without_concatenation() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (), (4,)]
    jacobians = [torch.randn((5, *s), generator=generator, dtype=torch.float64) for s in shapes]
    results = []
    for hook in [False, True]:
        params = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
        for p, j in zip(params, jacobians):
            p.jac = j
        aggregator = UPGrad()
        if hook:  # forces the concatenated route
            aggregator.register_forward_hook(lambda _m, _a, _o: None)
        weights = jac_to_grad(params, aggregator)
        results.append((weights, [p.grad for p in params]))
    assert_close(results[0], results[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("on_weighting", [False, True])
@pytest.mark.parametrize("pre", [False, True])
def test_optimize_refuses_hooks_on_aggregator_or_weighting(on_weighting: bool, pre: bool) -> None:
    aggregator = UPGrad()
    module = aggregator.weighting if on_weighting else aggregator
    if pre:
        module.register_forward_pre_hook(lambda _m, _a: None)
    else:
        module.register_forward_hook(lambda _m, _a, _o: None)
    p = _param_with_jac([[1.0, 0.0], [-1.0, 1.0]])
    with pytest.raises(ValueError):
        jac_to_grad([p], aggregator, optimize_gramian_computation=True)


@pytest.mark.parametrize("optimize", [False, True])
def test_hook_on_gramian_weighting_only(optimize: bool) -> None:
    aggregator = UPGrad()
    aggregator.gramian_weighting.register_forward_hook(lambda _m, _a, output: 2 * output)
    p = _param_with_jac([[1.0, 1.0], [2.0, 1.0]])
    weights = jac_to_grad([p], aggregator, optimize_gramian_computation=optimize)
    assert_close(weights, torch.tensor([1.0, 1.0]))
    assert_close(p.grad, torch.tensor([3.0, 2.0]))


def _scaling(factor: float) -> Callable[[nn.Module, object, Tensor], Tensor]:
    return lambda _module, _args, output: factor * output


def test_monitoring_hooks() -> None:
    """×3 on ``.weighting`` and ×5 on ``.gramian_weighting``: weights are 15× the raw ones; a hook
    doubling the aggregator's output doubles ``.grad`` but not the returned weights; the
    aggregator's hook runs exactly once and sees the concatenated matrix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    out = model(x)
    backward([out[:, 0].pow(2).mean(), out[:, 1].abs().mean(), out.sum()])
    params = list(model.parameters())
    jacobians = [p.jac for p in params]
    matrix = torch.cat([j.reshape(3, -1) for j in jacobians], dim=1)
    raw_weights = UPGrad().weighting(matrix)

    aggregator = UPGrad()
    aggregator.weighting.register_forward_hook(_scaling(3.0))
    aggregator.gramian_weighting.register_forward_hook(_scaling(5.0))
    seen: list[Tensor] = []

    def doubling(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        seen.append(args[0])
        return 2 * output

    aggregator.register_forward_hook(doubling)
    weights = jac_to_grad(params, aggregator)

    assert len(seen) == 1
    assert_close(seen[0], matrix)
    assert_close(weights, 15 * raw_weights)
    expected_grad = 2 * (15 * raw_weights) @ matrix
    assert_close(torch.cat([p.grad.reshape(-1) for p in params]), expected_grad)
    assert len(aggregator.weighting._forward_hooks) == 1  # the temporary hook is gone
