"""PCGrad: the spec's values, hand-derived cases, and the sequential definition."""

import numpy as np
import pytest
import quadprog
import torch
from torch import Tensor
from torch.testing import assert_close

from torchjd.aggregation import PCGrad, PCGradWeighting
from torchjd.aggregation._pcgrad import _draw_orders, _pcgrad_weights

from ._matrices import J_A, J_B, J_C, ONE, ZERO, ZR


def _sequential_pcgrad(gramian: Tensor) -> Tensor:
    """The definition, one task and one partner at a time, drawing as TorchJD does."""
    m = gramian.shape[0]
    weights = torch.zeros(m, dtype=gramian.dtype)
    for i in range(m):
        permutation = torch.randperm(m)
        coefficients = torch.zeros(m, dtype=gramian.dtype)
        coefficients[i] = 1.0
        for j in permutation.tolist():
            if j == i:
                continue
            inner = gramian[j] @ coefficients
            if inner < 0:
                coefficients[j] -= inner / gramian[j, j]
        weights += coefficients
    return weights


def _random_gramian(m: int, seed: int, dtype: torch.dtype) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 2 * m + 2, (1,), generator=generator))
    matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if m >= 3 and seed % 3 == 0:
        matrix[1] = 0.0  # a zero row
    return (matrix @ matrix.T).to(dtype)


# --- the spec's worked examples -------------------------------------------------------------


def test_spec_values_on_j_a() -> None:
    assert_close(PCGrad()(J_A), torch.tensor([0.5848, 3.8012, 3.8012]), rtol=0, atol=1e-4)
    assert_close(PCGradWeighting()(J_A @ J_A.T), torch.tensor([2.2222, 1.5789]), rtol=0, atol=1e-4)


def test_spec_values_on_j_b_seed_0() -> None:
    torch.manual_seed(0)
    out = PCGrad()(J_B)
    torch.manual_seed(0)
    weights = PCGradWeighting()(J_B @ J_B.T)
    assert_close(out, torch.tensor([1.3633, 2.0367, 2.6067, 3.5600]), rtol=0, atol=1e-4)
    assert_close(weights, torch.tensor([1.5833, 1.5600, 1.0000]), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (0, [0.0, 0.4444, 1.6667, 1.2778]),
        (1, [0.0, 0.0, 2.0, 1.0]),
        (2, [-0.3750, 0.5694, 1.6667, 1.0278]),
        (3, [0.1111, 0.1111, 1.8889, 1.1667]),
    ],
)
def test_spec_values_on_j_c(seed: int, expected: list[float]) -> None:
    torch.manual_seed(seed)
    assert_close(PCGrad()(J_C), torch.tensor(expected), rtol=0, atol=1e-4)


def test_spec_weights_on_j_c_seed_0() -> None:
    torch.manual_seed(0)
    weights = PCGradWeighting()(J_C @ J_C.T)
    assert_close(weights, torch.tensor([2.1111, 2.1111, 1.6667]), rtol=0, atol=1e-4)


def test_spec_orders_seed_0() -> None:
    # The spec's draws for seed 0 and m = 3 are [2, 0, 1], [2, 1, 0], [1, 2, 0]; task i skips i.
    torch.manual_seed(0)
    assert torch.equal(_draw_orders(1, 3), torch.tensor([[[2, 1], [2, 0], [1, 0]]]))


@pytest.mark.parametrize("m", [0, 1, 2, 5])
def test_consumes_m_randperms_of_m(m: int) -> None:
    torch.manual_seed(7)
    PCGrad()(torch.randn(m, 3, generator=torch.Generator().manual_seed(0)))
    after_call = torch.rand(4)
    torch.manual_seed(7)
    for _ in range(m):
        torch.randperm(m)
    assert torch.equal(after_call, torch.rand(4))


# --- hand-derived cases ---------------------------------------------------------------------


def test_two_conflicting_rows_follow_the_projection_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    g1 = torch.randn(5, generator=generator, dtype=torch.float64)
    g2 = -g1 + 0.5 * torch.randn(5, generator=generator, dtype=torch.float64)
    inner = g1 @ g2
    assert inner < 0
    expected = (g1 - inner / (g2 @ g2) * g2) + (g2 - inner / (g1 @ g1) * g1)
    assert_close(PCGrad()(torch.stack([g1, g2])), expected, rtol=1e-12, atol=1e-12)


def test_non_conflicting_rows_are_summed() -> None:
    matrix = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0], [2.0, 1.0, 1.0]], dtype=torch.float64)
    assert (matrix @ matrix.T >= 0).all()
    for seed in range(3):
        torch.manual_seed(seed)
        assert_close(PCGrad()(matrix), matrix.sum(dim=0), rtol=0, atol=0)


def test_two_rows_equal_the_sum_of_dual_cone_projections() -> None:
    # For m = 2, g_i^PC is the projection of g_i onto the dual cone {d : J d >= 0} (the spec's
    # property: UPGrad with preference [1, 1] and no regularisation), whose weights are
    # v_i = argmin_{v >= e_i} v^T G v (Proposition 1 of arXiv:2406.16232), solved by quadprog.
    generator = torch.Generator().manual_seed(3)
    for k in range(6):
        matrix = torch.randn(2, 4, generator=generator, dtype=torch.float64)
        matrix[1] += (k % 2 - 0.5) * 2.0 * matrix[0]  # alternately conflicting or not
        gramian = matrix @ matrix.T
        assert (gramian[0, 1] < 0) == (k % 2 == 0)
        expected = sum(
            quadprog.solve_qp(gramian.numpy(), np.zeros(2), np.eye(2), np.eye(2)[i])[0]
            for i in range(2)
        )
        assert_close(PCGradWeighting()(gramian), torch.from_numpy(expected), rtol=1e-9, atol=1e-9)


# --- the vectorised kernel against the sequential definition --------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 8, 10, 12])
def test_matches_sequential_definition(m: int, dtype: torch.dtype) -> None:
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    for seed in range(3):
        gramian = _random_gramian(m, seed, dtype)
        torch.manual_seed(seed)
        expected = _sequential_pcgrad(gramian)
        torch.manual_seed(seed)
        actual = PCGradWeighting()(gramian)
        scale = float(expected.abs().max())
        assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


# --- edge cases, dtype, gradients -----------------------------------------------------------


def test_edge_cases() -> None:
    assert torch.equal(PCGrad()(ZERO), torch.zeros(3))
    assert torch.equal(PCGrad()(ONE), ONE[0])
    assert torch.equal(PCGrad()(ZR), torch.tensor([1.0, 2.0, -1.0]))
    assert torch.equal(PCGrad()(torch.zeros(0, 3)), torch.zeros(3))
    assert PCGrad()(torch.zeros(2, 0)).shape == (0,)
    assert PCGradWeighting()(torch.zeros(0, 0)).shape == (0,)


def test_zero_norm_partner_with_conflict_stays_finite() -> None:
    # Not an exact Gramian: G_00 = 0 but G_10 < 0. The definition divides by 0; we do not project.
    gramian = torch.tensor([[0.0, -1.0], [-1.0, 1.0]])
    assert torch.equal(PCGradWeighting()(gramian), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_preserves_dtype(dtype: torch.dtype) -> None:
    out = PCGradWeighting()(J_B.to(dtype) @ J_B.to(dtype).T)
    assert out.dtype == dtype


def test_not_differentiable_including_hooks() -> None:
    matrix = J_B.clone().requires_grad_()
    assert not PCGrad()(matrix).requires_grad
    assert not PCGradWeighting()(matrix @ matrix.T).requires_grad
    aggregator = PCGrad()
    aggregator.register_forward_hook(lambda module, inputs, output: output * inputs[0].sum())
    assert not aggregator(matrix).requires_grad


def test_repr_and_str() -> None:
    assert repr(PCGrad()) == "PCGrad()"
    assert str(PCGrad()) == "PCGrad"
    assert repr(PCGradWeighting()) == "PCGradWeighting()"
    assert str(PCGradWeighting()) == "PCGradWeighting()"


# --- batched entry points -------------------------------------------------------------------


def test_batched_equals_a_loop() -> None:
    gramians = torch.stack([_random_gramian(5, seed, torch.float64) for seed in range(4)])
    torch.manual_seed(0)
    expected = torch.stack([PCGradWeighting()(gramian) for gramian in gramians])
    torch.manual_seed(0)
    batched = PCGradWeighting()._forward_batched(gramians)
    torch.manual_seed(0)
    grouped = PCGradWeighting._forward_grouped([PCGradWeighting() for _ in range(4)], gramians)
    assert_close(batched, expected, rtol=1e-12, atol=1e-12)
    assert_close(grouped, expected, rtol=1e-12, atol=1e-12)


def test_kernel_accepts_any_leading_dimensions() -> None:
    gramians = torch.stack([_random_gramian(4, seed, torch.float64) for seed in range(6)])
    orders = _draw_orders(6, 4)
    flat = _pcgrad_weights(gramians, orders)
    nested = _pcgrad_weights(gramians.view(2, 3, 4, 4), orders.view(2, 3, 4, 3))
    assert nested.shape == (2, 3, 4)
    assert_close(nested.reshape(6, 4), flat, rtol=0, atol=0)
    for k in range(6):
        assert_close(_pcgrad_weights(gramians[k], orders[k]), flat[k], rtol=1e-12, atol=1e-12)


def test_grouped_rejects_a_wrong_number_of_weightings() -> None:
    with pytest.raises(ValueError, match="one weighting per Gramian"):
        PCGradWeighting._forward_grouped([PCGradWeighting()], torch.zeros(2, 3, 3))


@pytest.mark.parametrize("m", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_few_tasks_on_the_cpu_equal_the_tensor_kernel(m: int, dtype: torch.dtype) -> None:
    # One Gramian of up to 8 tasks on the CPU is weighed with Python numbers: same weights as the
    # kernel with the same draws (conflicting, aligned, zero rows, non-finite), same draws made.
    generator = torch.Generator().manual_seed(3)
    J = torch.randn(20, m, 4, generator=generator, dtype=dtype)
    gramians = list(J @ J.transpose(1, 2))
    gramians += [torch.zeros(m, m, dtype=dtype), torch.diag(torch.arange(m, dtype=dtype))]
    gramians += [torch.full((m, m), -1.0, dtype=dtype).fill_diagonal_(float("nan"))]
    for gramian in gramians:
        torch.manual_seed(5)
        kernel = _pcgrad_weights(gramian, _draw_orders(1, m)[0])
        torch.manual_seed(5)
        weights = PCGradWeighting()(gramian)
        after_call = torch.rand(2)
        torch.manual_seed(5)
        for _ in range(m):
            torch.randperm(m)
        assert torch.equal(after_call, torch.rand(2))
        assert weights.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert_close(weights, kernel, rtol=tol, atol=tol, equal_nan=True)
