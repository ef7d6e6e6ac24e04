import warnings

import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss

from torchjd import Stateful
from torchjd.aggregation import GradNorm, GradNormWeighting
from torchjd.autogram import Engine
from torchjd.autojac import jac_to_grad, mtl_backward

# Rows of norms 3 and 4, orthogonal: G = diag(9, 16).
J = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)


def test_worked_example_over_three_calls() -> None:
    # lr = 0.1, alpha = 1. Call 1 (losses [2, 1] are L(0)): returns w = [1, 1]; rates r = [1, 1],
    # G_w = [3, 4], target 3.5, dL/dw = sign([-0.5, 0.5]) * [3, 4] = [-3, 4];
    # w <- [1.3, 0.6] * 2 / 1.9 = [26/19, 12/19].
    # Call 2 (losses [1, 0.8]): returns [26/19, 12/19]; L~ = [0.5, 0.8], r = [10/13, 16/13];
    # G_w = [78/19, 48/19], mean 63/19, targets [630/247, 1008/247] ~ [2.55, 4.08]; signs [+, -];
    # w <- [26/19 - 0.3, 12/19 + 0.4] = [20.3/19, 19.6/19], renormalised: [40.6/39.9, 39.2/39.9].
    aggregator = GradNorm(alpha=1.0, lr=0.1)
    expected = [
        torch.tensor([3.0, 4.0]),
        torch.tensor([3.0 * 26 / 19, 4.0 * 12 / 19]),
        torch.tensor([3.0 * 40.6 / 39.9, 4.0 * 39.2 / 39.9]),
    ]
    losses = [[2.0, 1.0], [1.0, 0.8], [1.0, 0.8]]
    for call_losses, wanted in zip(losses, expected):
        aggregator.update_losses(torch.tensor(call_losses))
        torch.testing.assert_close(aggregator(J), wanted.double())


def test_the_task_that_trains_slower_gets_more_weight() -> None:
    # Equal gradient norms; task 1's loss halves while task 0's stays: r_0 > 1 > r_1.
    weighting = GradNormWeighting(alpha=1.5, lr=0.05)
    gramian = torch.eye(2, dtype=torch.float64)
    for losses in ([1.0, 1.0], [1.0, 0.5], [1.0, 0.5]):
        weighting.update_losses(torch.tensor(losses))
        weights = weighting(gramian)
    assert weights[0] > 1.0 > weights[1]
    torch.testing.assert_close(weights.sum(), torch.tensor(2.0, dtype=torch.float64))


def test_weights_sum_to_m_and_stay_non_negative_with_a_large_step() -> None:
    weighting = GradNormWeighting(alpha=1.0, lr=100.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        matrix = torch.randn(4, 6, generator=generator, dtype=torch.float64)
        weighting.update_losses(torch.rand(4, generator=generator, dtype=torch.float64) + 0.1)
        weights = weighting(matrix @ matrix.T)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(), torch.tensor(4.0, dtype=torch.float64))


def test_alpha_zero_with_equal_norms_keeps_the_weights() -> None:
    # Every weighted norm equals the mean: L_grad's gradient is 0 whatever the losses.
    weighting = GradNormWeighting(alpha=0.0, lr=1.0)
    gramian = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
    for losses in ([1.0, 2.0], [0.1, 3.0], [5.0, 0.2]):
        weighting.update_losses(torch.tensor(losses))
        torch.testing.assert_close(weighting(gramian), torch.ones(2))


def test_invariant_to_the_scale_of_each_loss() -> None:
    # GradNorm reads the losses only through L_i(t) / L_i(0).
    generator = torch.Generator().manual_seed(1)
    matrices = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    losses = [torch.rand(3, generator=generator, dtype=torch.float64) + 0.5 for _ in range(4)]
    scales = torch.tensor([1e-3, 1.0, 250.0], dtype=torch.float64)
    plain, scaled = GradNorm(lr=0.1), GradNorm(lr=0.1)
    for matrix, values in zip(matrices, losses):
        plain.update_losses(values)
        scaled.update_losses(values * scales)
        torch.testing.assert_close(scaled(matrix), plain(matrix))


def test_permutation_of_the_tasks_over_calls() -> None:
    generator = torch.Generator().manual_seed(2)
    matrices = [torch.randn(4, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    losses = [torch.rand(4, generator=generator, dtype=torch.float64) + 0.5 for _ in range(4)]
    permutation = torch.tensor([2, 0, 3, 1])
    plain, permuted = GradNormWeighting(lr=0.2), GradNormWeighting(lr=0.2)
    for matrix, values in zip(matrices, losses):
        plain.update_losses(values)
        permuted.update_losses(values[permutation])
        shuffled = matrix[permutation]
        torch.testing.assert_close(
            permuted(shuffled @ shuffled.T), plain(matrix @ matrix.T)[permutation]
        )


def test_zero_initial_loss_stays_finite() -> None:
    weighting = GradNormWeighting()
    for losses in ([0.0, 1.0], [0.0, 0.0], [1.0, 0.5]):
        weighting.update_losses(torch.tensor(losses))
        assert torch.isfinite(weighting(torch.eye(2))).all()


def test_needs_the_losses_at_every_call() -> None:
    aggregator = GradNorm()
    with pytest.raises(ValueError, match="update_losses"):
        aggregator(J)
    aggregator.update_losses([torch.tensor(1.0), torch.tensor(2.0)])
    aggregator(J)
    with pytest.raises(ValueError, match="update_losses"):
        aggregator(J)  # the losses were used by the previous call


def test_rejects_a_wrong_number_of_losses() -> None:
    aggregator = GradNorm()
    aggregator.update_losses(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="3 loss values for 2 objectives"):
        aggregator(J)


@pytest.mark.parametrize(
    ("losses", "error"),
    [
        (torch.ones(2, 2), ValueError),
        ([], ValueError),
        ([torch.ones(2), torch.ones(2)], ValueError),
        ([1.0, 2.0], TypeError),
    ],
)
def test_update_losses_rejects_bad_input(losses: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="losses"):
        GradNorm().update_losses(losses)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "name"), [({"alpha": -0.1}, "alpha"), ({"lr": 0.0}, "lr")])
def test_rejects_bad_hyper_parameters(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GradNorm(**kwargs)
    with pytest.raises(ValueError, match=name):
        GradNormWeighting(**kwargs)


def test_repr_and_properties() -> None:
    aggregator = GradNorm(alpha=0.5, lr=0.01)
    assert repr(aggregator) == "GradNorm(alpha=0.5, lr=0.01)"
    assert repr(aggregator.gramian_weighting) == "GradNormWeighting(alpha=0.5, lr=0.01)"
    aggregator.alpha = 2.0
    assert aggregator.gramian_weighting.alpha == 2.0
    assert isinstance(aggregator, Stateful) and isinstance(aggregator.gramian_weighting, Stateful)


def _used(history: int) -> GradNorm:
    aggregator = GradNorm(lr=0.3)
    generator = torch.Generator().manual_seed(5)
    for _ in range(history):
        aggregator.update_losses(torch.rand(3, generator=generator) + 0.1)
        aggregator(torch.randn(3, 4, generator=generator))
    return aggregator


def test_state_dict_with_pending_losses_loads_into_a_fresh_instance() -> None:
    used = _used(3)
    used.update_losses(torch.tensor([0.3, 0.2, 0.9]))
    restored = GradNorm(lr=0.3)
    restored.load_state_dict(used.state_dict())
    matrix = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(restored(matrix), used(matrix), rtol=0, atol=0)


def test_reset_forgets_weights_initial_losses_and_pending_losses() -> None:
    used = _used(3)
    used.update_losses(torch.tensor([0.3, 0.2, 0.9]))
    used.reset()
    with pytest.raises(ValueError, match="update_losses"):
        used(torch.ones(3, 4))
    used.update_losses(torch.tensor([0.3, 0.2, 0.9]))
    torch.testing.assert_close(used(torch.ones(3, 4)), torch.full((4,), 3.0))


def test_warns_when_the_number_of_tasks_changes() -> None:
    aggregator = _used(2)
    aggregator.update_losses(torch.ones(2))
    with pytest.warns(UserWarning, match="re-initialises"):
        out = aggregator(torch.ones(2, 4))
    torch.testing.assert_close(out, torch.full((4,), 2.0))


def test_through_jac_to_grad_equals_the_aggregator_on_the_concatenation() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    heads = [nn.Linear(3, 1) for _ in range(3)]
    x, targets = torch.randn(8, 4), [torch.randn(8, 1) for _ in range(3)]
    via_pipeline, direct = GradNorm(lr=0.1), GradNorm(lr=0.1)
    for _ in range(3):
        features = trunk(x)
        losses = [mse_loss(head(features), t) for head, t in zip(heads, targets)]
        mtl_backward(losses, features=features)
        matrix = torch.cat([p.jac.reshape(3, -1) for p in trunk.parameters()], dim=1)
        via_pipeline.update_losses(losses)
        jac_to_grad(trunk.parameters(), via_pipeline)
        direct.update_losses(losses)
        expected = direct(matrix)
        obtained = torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])
        torch.testing.assert_close(obtained, expected, rtol=1e-5, atol=1e-6)
        for p in trunk.parameters():
            p.grad = None
        for head in heads:
            head.zero_grad()


def test_gramian_first_path_with_autogram() -> None:
    # The weighting needs only the Gramian and the losses: it runs on the Gramian of the autogram
    # engine, and the weights it returns are those of the aggregator on the Jacobian.
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(5, 3)
    engine = Engine(model, batch_dim=0)
    weighting = GradNormWeighting(lr=0.1)
    reference = GradNormWeighting(lr=0.1)
    for _ in range(2):
        losses = (model(x).squeeze(1) - 1.0) ** 2
        gramian = engine.compute_gramian(losses)
        weighting.update_losses(losses)
        weights = weighting(gramian)
        # Row i of the Jacobian of (w . x_i + b - 1)^2 is 2 (w . x_i + b - 1) [x_i, 1].
        with torch.no_grad():
            residuals = model.weight @ x.T + model.bias - 1.0
        rows = 2.0 * residuals.reshape(-1, 1) * torch.cat([x, torch.ones(5, 1)], dim=1)
        reference.update_losses(losses)
        torch.testing.assert_close(weights, reference(rows @ rows.T), rtol=1e-5, atol=1e-6)
        losses.backward(weights)
        model.zero_grad()


def test_training_loop_decreases_every_loss() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(2))
    x = torch.randn(64, 5)
    targets = [x[:, :1] * 2.0, 10.0 * x[:, 1:2].sin()]  # two scales of loss
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.02)
    aggregator = GradNorm(lr=0.05)

    def losses(features: torch.Tensor) -> list[torch.Tensor]:
        return [mse_loss(head(features), t) for head, t in zip(heads, targets)]

    with torch.no_grad():
        before = torch.stack(losses(trunk(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(25):
            features = trunk(x)
            task_losses = losses(features)
            mtl_backward(task_losses, features=features)
            aggregator.update_losses(task_losses)
            jac_to_grad(trunk.parameters(), aggregator)
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        after = torch.stack(losses(trunk(x)))
    assert (after < before).all()
    weights = aggregator.gramian_weighting._weights
    torch.testing.assert_close(weights.sum(), torch.tensor(2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_outputs_and_state_on_cuda() -> None:
    on_cpu, on_cuda = GradNorm(lr=0.1), GradNorm(lr=0.1)
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        matrix = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        losses = torch.rand(3, generator=generator, dtype=torch.float64) + 0.1
        on_cpu.update_losses(losses)
        on_cuda.update_losses(losses.cuda())
        out = on_cuda(matrix.cuda())
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), on_cpu(matrix))
    for value in on_cuda.state_dict().values():
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            assert value.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_match_float32(dtype: torch.dtype) -> None:
    # The update is computed in float64 and stored in the input's dtype.
    half, full = GradNormWeighting(lr=0.1), GradNormWeighting(lr=0.1)
    gramian = torch.tensor([[4.0, 1.0], [1.0, 9.0]])
    for losses in ([1.0, 2.0], [0.5, 1.9], [0.4, 1.8]):
        half.update_losses(torch.tensor(losses))
        full.update_losses(torch.tensor(losses))
        out = half(gramian.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), full(gramian), rtol=1e-2, atol=1e-2)


def test_batched_groups_equal_successive_calls() -> None:
    # The batched entry point of the grouped path: each weighting keeps its own state and losses.
    generator = torch.Generator().manual_seed(8)
    grouped = [GradNormWeighting(lr=0.1), GradNormWeighting(alpha=0.5, lr=0.3)]
    looped = [GradNormWeighting(lr=0.1), GradNormWeighting(alpha=0.5, lr=0.3)]
    for _ in range(3):
        matrices = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
        gramians = matrices @ matrices.transpose(1, 2)
        losses = torch.rand(2, 3, generator=generator, dtype=torch.float64) + 0.1
        for weighting, values in zip([*grouped, *looped], [*losses, *losses]):
            weighting.update_losses(values)
        batched = GradNormWeighting._forward_grouped(grouped, gramians)
        expected = torch.stack([w(g) for w, g in zip(looped, gramians)])
        torch.testing.assert_close(batched, expected)


def test_batched_groups_check_every_group_before_changing_any() -> None:
    first, second = GradNormWeighting(), GradNormWeighting()
    first.update_losses(torch.ones(2))
    with pytest.raises(ValueError, match="update_losses"):
        GradNormWeighting._forward_grouped([first, second], torch.eye(2).repeat(2, 1, 1))
    torch.testing.assert_close(first(torch.eye(2)), torch.ones(2))  # its losses are still there


def test_grouped_aggregator_with_losses_given_to_every_group() -> None:
    from torchjd.grouping import GroupedAggregator

    torch.manual_seed(0)
    p, q = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    grouped = GroupedAggregator([[p], [q]], lambda: GradNorm(lr=0.1))
    looped = [GradNorm(lr=0.1), GradNorm(lr=0.1)]
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        jacs = [torch.randn(2, 3, generator=generator), torch.randn(2, 2, 2, generator=generator)]
        losses = torch.rand(2, generator=generator) + 0.2
        p.jac, q.jac = jacs
        for aggregator in [*grouped.aggregators, *looped]:
            aggregator.update_losses(losses)
        grouped.jac_to_grad()
        for tensor, jac, aggregator in zip((p, q), jacs, looped):
            torch.testing.assert_close(tensor.grad.reshape(-1), aggregator(jac.reshape(2, -1)))
            tensor.grad = None
