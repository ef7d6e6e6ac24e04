"""GradVac: the spec's values, the EMA worked by hand, the sequential definition, the state."""

import math
import warnings

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from torchjd import Stateful
from torchjd._precision import working_dtype
from torchjd.aggregation import GradVac, GradVacWeighting, PCGrad
from torchjd.aggregation._gradvac import _draw_orders, _gradvac_weights

from ._matrices import J_A, J_B, J_C, ONE, ZERO, ZR


def _sequential_gradvac(gramian: Tensor, phi_hat: Tensor, beta: float, eps: float) -> Tensor:
    """The definition, one task and one partner at a time, drawing as TorchJD does.

    Updates ``phi_hat`` in place and returns the weights.
    """
    m = gramian.shape[0]
    coefficients = torch.eye(m, dtype=gramian.dtype)
    for i in range(m):
        c = coefficients[i] @ gramian
        others = [k for k in range(m) if k != i]
        permutation = torch.randperm(m - 1)
        for j in [others[k] for k in permutation.tolist()]:
            a = torch.sqrt(torch.clamp(c @ coefficients[i], min=0.0))
            b = torch.sqrt(torch.clamp(gramian[j, j], min=0.0))
            phi = c[j] / (a * b + eps)
            target = phi_hat[i, j].clone()
            if phi < target:
                sine = torch.sqrt(torch.clamp(1 - phi**2, min=0.0))
                target_sine = torch.sqrt(torch.clamp(1 - target**2, min=0.0))
                omega = a * (target * sine - phi * target_sine) / (b * target_sine + eps)
                coefficients[i, j] += omega
                c = c + omega * gramian[j]
            phi_hat[i, j] = (1 - beta) * target + beta * phi
    return coefficients.sum(dim=0)


def _random_gramian(m: int, seed: int, dtype: torch.dtype, full_rank: bool = True) -> Tensor:
    """Gramian of a random matrix; one row is zero when ``m >= 3`` and ``seed % 3 == 0``.

    Apart from that zero row it has full rank unless ``full_rank=False``. (With linearly dependent
    rows a projection can leave a rounding-noise gradient, whose cosines, hence the targets, are
    noise: only the weights are then comparable.)
    """
    generator = torch.Generator().manual_seed(seed)
    low = m + 1 if full_rank else 1
    n = int(torch.randint(low, 2 * m + 2, (1,), generator=generator))
    matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if m >= 3 and seed % 3 == 0:
        matrix[1] = 0.0  # a zero row
    return (matrix @ matrix.T).to(dtype)


# --- the spec's worked examples -------------------------------------------------------------


def test_spec_three_calls_on_j_a_and_reset() -> None:
    aggregator = GradVac()
    expected = [[0.5848, 3.8012, 3.8012], [1.0065, 3.2644, 3.2644], [1.3245, 2.8597, 2.8597]]
    for values in expected:
        assert_close(aggregator(J_A), torch.tensor(values), rtol=0, atol=1e-4)
    phi_hat = aggregator.gramian_weighting.phi_hat
    assert_close(phi_hat, torch.tensor([[0.0, -0.7360], [-0.7360, 0.0]]), rtol=0, atol=1e-4)
    aggregator.reset()
    assert_close(aggregator(J_A), torch.tensor(expected[0]), rtol=0, atol=1e-4)
    assert_close(GradVacWeighting()(J_A @ J_A.T), torch.tensor([2.2222, 1.5789]), rtol=0, atol=1e-4)


def test_spec_three_calls_on_j_c_seed_0() -> None:
    torch.manual_seed(0)
    aggregator = GradVac()
    expected = [
        [0.1111, 0.1111, 1.8889, 1.1667],
        [-0.1103, 0.1793, 1.3702, 0.7541],
        [-0.1918, 0.1659, 1.1302, 0.5393],
    ]
    for values in expected:
        assert_close(aggregator(J_C), torch.tensor(values), rtol=0, atol=1e-4)


def test_spec_orders_seed_0() -> None:
    # The spec's three randperm(2) draws for seed 0 are [0, 1], [1, 0], [1, 0]; they order the
    # other tasks [1, 2], [0, 2], [0, 1].
    torch.manual_seed(0)
    assert torch.equal(_draw_orders(1, 3), torch.tensor([[[1, 2], [2, 0], [1, 0]]]))


@pytest.mark.parametrize(
    ("seed", "expected"), [(0, [2.1111, 2.0, 1.8889]), (1, [1.8611, 2.2361, 1.6667])]
)
def test_spec_weights_on_j_c(seed: int, expected: list[float]) -> None:
    torch.manual_seed(seed)
    assert_close(GradVacWeighting()(J_C @ J_C.T), torch.tensor(expected), rtol=0, atol=1e-4)


def test_spec_values_on_j_b_and_extreme_betas() -> None:
    first = torch.tensor([1.3633, 2.0367, 2.6067, 3.5600])
    torch.manual_seed(0)
    assert_close(GradVac()(J_B), first, rtol=0, atol=1e-4)
    torch.manual_seed(0)
    aggregator = GradVac(beta=1.0)
    assert_close(aggregator(J_B), first, rtol=0, atol=1e-4)
    assert_close(aggregator(J_B), torch.tensor([0.3098, 1.5951, 2.1902, 3.3804]), rtol=0, atol=1e-4)
    torch.manual_seed(0)
    aggregator = GradVac(beta=0.0)
    assert_close(aggregator(J_B), first, rtol=0, atol=1e-4)
    assert_close(aggregator(J_B), first, rtol=0, atol=1e-4)


def test_same_seed_same_numbers_and_aggregator_equals_weighting() -> None:
    outputs = []
    for _ in range(2):
        torch.manual_seed(5)
        aggregator = GradVac(beta=0.3)
        outputs.append(torch.stack([aggregator(J_B), aggregator(J_B)]))
    assert torch.equal(outputs[0], outputs[1])
    torch.manual_seed(5)
    from_weighting = GradVacWeighting(beta=0.3)(J_B @ J_B.T) @ J_B
    torch.manual_seed(5)
    assert_close(GradVac(beta=0.3)(J_B), from_weighting, rtol=0, atol=1e-4)


@pytest.mark.parametrize("m", [0, 1, 2, 3, 6])
def test_consumes_m_randperms_of_m_minus_1(m: int) -> None:
    torch.manual_seed(7)
    GradVac()(torch.randn(m, 3, generator=torch.Generator().manual_seed(0)))
    after_call = torch.rand(4)
    torch.manual_seed(7)
    for _ in range(m):
        torch.randperm(m - 1)
    assert torch.equal(after_call, torch.rand(4))


# --- the moving average worked by hand (m = 2, deterministic) -------------------------------


def test_ema_recurrence_by_hand() -> None:
    # J = [[1, 0], [-1, 1]]: ||g_1|| = 1, ||g_2|| = sqrt(2), cos = -1/sqrt(2) at every call, since
    # with m = 2 each task visits its only partner with its original gradient. With beta = 1/2 the
    # target after k calls is phi_hat_k = -(1 - 2^-k) / sqrt(2). When phi < phi_hat, task i adds
    # omega_i g_j with omega_i = ||g_i|| (phi_hat s - phi s_hat) / (||g_j|| s_hat), where
    # s = sqrt(1 - phi^2) = 1/sqrt(2) and s_hat = sqrt(1 - phi_hat^2); the output is
    # (1 + omega_2) g_1 + (1 + omega_1) g_2 = [omega_2 - omega_1, 1 + omega_1].
    # Call 1 (phi_hat = 0): omega_1 = 1/2, omega_2 = 1 -> [0.5, 1.5].
    # Call 2 (phi_hat = -1/(2 sqrt 2), s_hat = sqrt(7/8)): the numerator is (sqrt7 - 1)/4, so
    #   omega_1 = (sqrt7 - 1)/(2 sqrt7) and omega_2 = (sqrt7 - 1)/sqrt7.
    # Call 3 (phi_hat = -3/(4 sqrt 2), s_hat = sqrt(23/32)): the numerator is (sqrt23 - 3)/8, so
    #   omega_1 = (sqrt23 - 3)/(2 sqrt23) and omega_2 = (sqrt23 - 3)/sqrt23.
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    omega_1 = [
        0.5,
        (math.sqrt(7) - 1) / (2 * math.sqrt(7)),
        (math.sqrt(23) - 3) / (2 * math.sqrt(23)),
    ]
    expected = [[w, 1 + w] for w in omega_1]  # omega_2 = 2 omega_1
    aggregator = GradVac(beta=0.5)
    for k in range(3):
        out = aggregator(matrix)
        assert_close(out, torch.tensor(expected[k], dtype=torch.float64), rtol=0, atol=1e-7)
        target = -(1 - 2.0 ** -(k + 1)) / math.sqrt(2)
        phi_hat = torch.tensor([[0.0, target], [target, 0.0]], dtype=torch.float64)
        assert_close(aggregator.gramian_weighting.phi_hat, phi_hat, rtol=0, atol=1e-7)
    aggregator.reset()
    assert_close(
        aggregator(matrix), torch.tensor([0.5, 1.5], dtype=torch.float64), rtol=0, atol=1e-7
    )


def test_first_call_on_two_rows_is_pcgrad() -> None:
    # With zero targets the correction is the PCGrad projection (up to eps).
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        matrix = torch.randn(2, 5, generator=generator, dtype=torch.float64)
        assert_close(GradVac()(matrix), PCGrad()(matrix), rtol=1e-6, atol=1e-6)


# --- the vectorised kernel against the sequential definition --------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 9, 12])
def test_matches_sequential_definition_over_calls(m: int, dtype: torch.dtype) -> None:
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    for seed, beta in [(m, 0.5), (m + 1, 0.3), (m + 2, 1.0 if m % 2 else 0.0)]:
        weighting = GradVacWeighting(beta=beta)
        phi_hat = torch.zeros(m, m, dtype=dtype)
        torch.manual_seed(seed)
        for call in range(3):
            gramian = _random_gramian(m, 10 * seed + call, dtype)
            state = torch.random.get_rng_state()
            expected = _sequential_gradvac(gramian, phi_hat, beta, 1e-8)
            torch.random.set_rng_state(state)
            actual = weighting(gramian)
            scale = float(expected.abs().max())
            assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)
            assert_close(weighting.phi_hat, phi_hat, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [2, 3, 5, 8, 12])
def test_matches_sequential_definition_on_rank_deficient_gramians(
    m: int, dtype: torch.dtype
) -> None:
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    for seed in range(3):
        gramian = _random_gramian(m, 50 + seed, dtype, full_rank=False)
        torch.manual_seed(seed)
        expected = _sequential_gradvac(gramian, torch.zeros(m, m, dtype=dtype), 0.5, 1e-8)
        torch.manual_seed(seed)
        actual = GradVacWeighting()(gramian)
        scale = float(expected.abs().max())
        assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


def test_matches_sequential_definition_with_eps_zero() -> None:
    # Without zero rows, eps = 0 divides by zero nowhere.
    weighting = GradVacWeighting(eps=0.0)
    phi_hat = torch.zeros(5, 5, dtype=torch.float64)
    for call in range(3):
        gramian = _random_gramian(5, 100 + 3 * call + 1, torch.float64)
        torch.manual_seed(call)
        expected = _sequential_gradvac(gramian, phi_hat, 0.5, 0.0)
        torch.manual_seed(call)
        assert_close(weighting(gramian), expected, rtol=1e-9, atol=1e-9)
        assert_close(weighting.phi_hat, phi_hat, rtol=1e-9, atol=1e-9)


def test_eps_zero_with_a_zero_row_stays_finite() -> None:
    # The definition gives 0/0 for the zero row's cosines; we use 0 instead.
    aggregator = GradVac(eps=0.0)
    for _ in range(3):
        out = aggregator(ZR)
        assert torch.equal(out, torch.tensor([1.0, 2.0, -1.0]))
        assert torch.isfinite(aggregator.gramian_weighting.phi_hat).all()


# --- edge cases, dtype, gradients, validation -----------------------------------------------


def test_edge_cases() -> None:
    assert torch.equal(GradVac()(ZERO), torch.zeros(3))
    assert torch.equal(GradVac()(ONE), ONE[0])
    assert torch.equal(GradVac()(ZR), torch.tensor([1.0, 2.0, -1.0]))
    assert torch.equal(GradVac()(torch.zeros(0, 3)), torch.zeros(3))
    assert GradVac()(torch.zeros(2, 0)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_and_output_follow_the_input_dtype(dtype: torch.dtype) -> None:
    weighting = GradVacWeighting()
    out = weighting(J_B.to(dtype) @ J_B.to(dtype).T)
    assert out.dtype == dtype
    assert weighting.phi_hat.dtype == dtype and weighting.phi_hat.shape == (3, 3)
    assert weighting.phi_hat.device == out.device


def test_not_differentiable_including_hooks() -> None:
    matrix = J_B.clone().requires_grad_()
    assert not GradVac()(matrix).requires_grad
    assert not GradVacWeighting()(matrix @ matrix.T).requires_grad
    aggregator = GradVac()
    aggregator.register_forward_hook(lambda module, inputs, output: output * inputs[0].sum())
    assert not aggregator(matrix).requires_grad


def test_is_stateful() -> None:
    assert isinstance(GradVac(), Stateful)
    assert isinstance(GradVacWeighting(), Stateful)


def test_repr_and_str() -> None:
    assert repr(GradVac()) == "GradVac(beta=0.5, eps=1e-08)"
    assert str(GradVac()) == "GradVac"
    assert repr(GradVac(beta=0.25, eps=0.001)) == "GradVac(beta=0.25, eps=0.001)"
    assert repr(GradVacWeighting()) == "GradVacWeighting()"


@pytest.mark.parametrize("cls", [GradVac, GradVacWeighting])
def test_validation(cls: type) -> None:
    for beta in (1.1, -0.1, float("nan")):
        with pytest.raises(ValueError, match="`beta`"):
            cls(beta=beta)
    for eps in (-1e-9, float("nan")):
        with pytest.raises(ValueError, match="`eps`"):
            cls(eps=eps)
    instance = cls()
    with pytest.raises(ValueError, match="`beta`"):
        instance.beta = 1.5
    with pytest.raises(ValueError, match="`eps`"):
        instance.eps = -1.0
    assert instance.beta == 0.5 and instance.eps == 1e-8
    for beta in (0.0, 1.0):
        assert cls(beta=beta).beta == beta
    assert cls(eps=0.0).eps == 0.0


def test_aggregator_properties_delegate_to_the_weighting() -> None:
    aggregator = GradVac()
    aggregator.beta = 0.2
    aggregator.eps = 0.0
    assert aggregator.gramian_weighting.beta == 0.2
    assert aggregator.gramian_weighting.eps == 0.0
    assert repr(aggregator) == "GradVac(beta=0.2, eps=0.0)"


# --- the state: re-initialisation, reset, state_dict ----------------------------------------


def test_state_reinitialised_with_a_warning_when_m_or_dtype_changes() -> None:
    matrix_3 = J_B.to(torch.float64)
    aggregator = GradVac()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        aggregator(matrix_3)
        aggregator(matrix_3)  # same m and dtype: no warning
    with pytest.warns(UserWarning, match="re-initialises its state"):
        out = aggregator(J_A.to(torch.float64))
    assert_close(out, GradVac()(J_A.to(torch.float64)), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="re-initialises its state"):
        out = aggregator(J_A)  # float32 now
    assert_close(out, GradVac()(J_A), rtol=0, atol=0)
    aggregator.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggregator(matrix_3)  # after reset: like a first call


def _history(seed: int, m: int = 4, calls: int = 3) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(m, 6, generator=generator) for _ in range(calls)]


@pytest.mark.parametrize("cls", [GradVac, GradVacWeighting])
def test_state_dict_loads_into_a_fresh_instance(cls: type) -> None:
    def call(module: torch.nn.Module, matrix: Tensor) -> Tensor:
        return module(matrix if cls is GradVac else matrix @ matrix.T)

    used = cls(beta=0.3)
    for k, matrix in enumerate(_history(0)):
        torch.manual_seed(k)
        call(used, matrix.double())
    restored = cls(beta=0.3)
    restored.load_state_dict(used.state_dict())  # strict
    for k, matrix in enumerate(_history(1)):
        torch.manual_seed(100 + k)
        expected = call(used, matrix.double())
        torch.manual_seed(100 + k)
        assert torch.equal(call(restored, matrix.double()), expected)
    assert restored.state_dict().keys() == used.state_dict().keys()


def test_fresh_state_dict_loads_into_a_used_instance_as_a_reset() -> None:
    used = GradVac()
    for matrix in _history(2):
        used(matrix)
    used.load_state_dict(GradVac().state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(3)
        out = used(J_B)
    torch.manual_seed(3)
    assert torch.equal(out, GradVac()(J_B))


def test_state_dict_lists_the_targets_once() -> None:
    aggregator = GradVac()
    aggregator(J_A)
    keys = list(aggregator.state_dict().keys())
    assert [k for k in keys if "phi_hat" in k] == ["weighting.weighting.phi_hat"]
    assert set(keys) <= {"weighting.weighting.phi_hat", "weighting.weighting._extra_state"}


# --- batched entry points -------------------------------------------------------------------


def test_grouped_equals_a_loop_of_calls_and_writes_the_states_back() -> None:
    betas = [0.5, 0.5, 0.2, 1.0]
    looped = [GradVacWeighting(beta=beta) for beta in betas]
    grouped = [GradVacWeighting(beta=beta) for beta in betas]
    for call in range(3):
        gramians = torch.stack(
            [_random_gramian(5, 10 * call + k, torch.float64) for k in range(len(betas))]
        )
        torch.manual_seed(call)
        expected = torch.stack([w(g) for w, g in zip(looped, gramians)])
        torch.manual_seed(call)
        actual = GradVacWeighting._forward_grouped(grouped, gramians)
        assert_close(actual, expected, rtol=1e-12, atol=1e-12)
        for w_grouped, w_looped in zip(grouped, looped):
            assert_close(w_grouped.phi_hat, w_looped.phi_hat, rtol=1e-12, atol=1e-12)


def test_grouped_with_shared_parameters_and_different_eps() -> None:
    weightings = [GradVacWeighting(eps=eps) for eps in (1e-8, 0.0, 1e-3)]
    references = [GradVacWeighting(eps=eps) for eps in (1e-8, 0.0, 1e-3)]
    gramians = torch.stack([_random_gramian(4, k, torch.float64) for k in range(3)])
    torch.manual_seed(0)
    expected = torch.stack([w(g) for w, g in zip(references, gramians)])
    torch.manual_seed(0)
    assert_close(
        GradVacWeighting._forward_grouped(weightings, gramians), expected, rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="one weighting per Gramian"):
        GradVacWeighting._forward_grouped(weightings[:2], gramians)


def test_kernel_accepts_any_leading_dimensions() -> None:
    gramians = torch.stack([_random_gramian(4, seed, torch.float64) for seed in range(6)])
    phi_hat = 0.3 * torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(0)).double()
    orders = _draw_orders(6, 4)
    weights, new_phi_hat = _gradvac_weights(gramians, phi_hat, orders, 0.5, 1e-8)
    nested_weights, nested_phi_hat = _gradvac_weights(
        gramians.view(2, 3, 4, 4), phi_hat.view(2, 3, 4, 4), orders.view(2, 3, 4, 3), 0.5, 1e-8
    )
    assert nested_weights.shape == (2, 3, 4) and nested_phi_hat.shape == (2, 3, 4, 4)
    assert_close(nested_weights.reshape(6, 4), weights, rtol=0, atol=0)
    assert_close(nested_phi_hat.reshape(6, 4, 4), new_phi_hat, rtol=0, atol=0)
    for k in range(6):
        single_weights, single_phi_hat = _gradvac_weights(
            gramians[k], phi_hat[k], orders[k], 0.5, 1e-8
        )
        assert_close(single_weights, weights[k], rtol=1e-12, atol=1e-12)
        assert_close(single_phi_hat, new_phi_hat[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_opposite_rows_stay_finite_over_calls(dtype: torch.dtype) -> None:
    # Opposite rows small enough for their Gramian to underflow in float16: computed in float16,
    # the cosine is 0 / (0 + eps) with eps = 1e-8 rounded to 0, and the targets become NaN.
    torch.manual_seed(0)
    row = torch.randn(1, 16) * 1e-5
    matrix = torch.cat([row, -row]).to(dtype)
    aggregator = GradVac()
    for _ in range(3):
        out = aggregator(matrix)
        assert out.dtype == dtype and out.isfinite().all()
        phi_hat = aggregator.gramian_weighting.phi_hat
        # The state is kept in the dtype in which the weights are computed.
        assert phi_hat.dtype == working_dtype(dtype) and phi_hat.isfinite().all()


def test_half_precision_matches_float32() -> None:
    gramian = _random_gramian(5, 3, torch.float32)
    half, single = GradVacWeighting(), GradVacWeighting()
    for _ in range(3):
        torch.manual_seed(7)
        expected = single(gramian.half().float())
        torch.manual_seed(7)
        assert_close(half(gramian.half()).float(), expected, rtol=1e-2, atol=1e-2)


def test_two_tasks_grouped_with_mixed_parameters_match_the_definition() -> None:
    # The m = 2 closed form, batched, with per-group beta and eps (0 included), a zero row and
    # opposite rows, over calls, against the sequential definition.
    settings = [(0.5, 1e-8), (0.2, 0.0), (1.0, 1e-3), (0.0, 1e-8)]
    weightings = [GradVacWeighting(beta=beta, eps=eps) for beta, eps in settings]
    targets = [torch.zeros(2, 2, dtype=torch.float64) for _ in settings]
    for call in range(4):
        gramians = torch.stack([_random_gramian(2, 20 * call + k, torch.float64) for k in range(4)])
        gramians[3] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64) * (call + 1)
        if call == 2:
            gramians[0] = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        torch.manual_seed(call)
        expected = [
            _sequential_gradvac(g, phi_hat, beta, eps)
            for g, phi_hat, (beta, eps) in zip(gramians, targets, settings)
        ]
        torch.manual_seed(call)
        actual = GradVacWeighting._forward_grouped(weightings, gramians)
        assert_close(actual, torch.stack(expected), rtol=1e-12, atol=1e-12)
        for weighting, phi_hat in zip(weightings, targets):
            assert_close(weighting.phi_hat, phi_hat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [2, 3, 5, 8])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_single_calls_on_the_cpu_equal_the_grouped_path(m: int, eps: float) -> None:
    # One small Gramian on the CPU is weighed with Python numbers, a stack of them with tensors
    # (with the same random orders, drawn Gramian by Gramian).
    betas = [0.5, 0.2, 1.0]
    looped = [GradVacWeighting(beta=beta, eps=eps) for beta in betas]
    grouped = [GradVacWeighting(beta=beta, eps=eps) for beta in betas]
    for call in range(4):
        gramians = torch.stack(
            [_random_gramian(m, 10 * call + k, torch.float64) for k in range(len(betas))]
        )
        gramians[0, 1], gramians[0, :, 1] = 0.0, 0.0  # a zero row
        if call == 2:
            gramians[1, 0, 1] = torch.nan  # NaN weights, targets left as they were
        torch.manual_seed(call)
        expected = torch.stack([w(g) for w, g in zip(looped, gramians)])
        torch.manual_seed(call)
        actual = GradVacWeighting._forward_grouped(grouped, gramians)
        assert_close(actual, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert torch.isnan(actual[1]).all() == (call == 2)
        for w_grouped, w_looped in zip(grouped, looped):
            assert_close(w_grouped.phi_hat, w_looped.phi_hat, rtol=1e-12, atol=1e-12)


def test_the_stored_targets_go_through_a_global_buffer_registration_hook() -> None:
    # The targets are put in the buffer table directly only when no such hook must see them.
    seen: list[tuple[str, Tensor]] = []

    def hook(module: torch.nn.Module, name: str, tensor: Tensor) -> Tensor:
        seen.append((name, tensor))
        return tensor * 2.0

    gramian = _random_gramian(4, 7, torch.float32)
    plain, hooked = GradVacWeighting(), GradVacWeighting()
    torch.manual_seed(0)
    plain(gramian)
    handle = torch.nn.modules.module.register_module_buffer_registration_hook(hook)
    try:
        torch.manual_seed(0)
        hooked(gramian)
    finally:
        handle.remove()
    assert [name for name, _ in seen] == ["phi_hat"]
    assert torch.equal(seen[0][1], plain.phi_hat)
    assert torch.equal(hooked.phi_hat, 2.0 * plain.phi_hat)
    assert list(hooked.state_dict()) == list(plain.state_dict())
