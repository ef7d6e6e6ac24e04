import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchjd.linalg._simplex import project_onto_simplex


def _projection_by_bisection(y: torch.Tensor) -> torch.Tensor:
    """Independent reference: the KKT conditions give max(y - t, 0) with t the root of the
    decreasing function t -> sum(max(y - t, 0)) - 1, found here by bisection."""
    low, high = float(y.min()) - 1.0, float(y.max())
    for _ in range(200):
        middle = (low + high) / 2
        if float(torch.clamp(y - middle, min=0).sum()) > 1:
            low = middle
        else:
            high = middle
    return torch.clamp(y - (low + high) / 2, min=0)


def test_spec_examples() -> None:
    torch.testing.assert_close(
        project_onto_simplex(torch.tensor([0.5, 0.1, 0.1])), torch.tensor([0.6, 0.2, 0.2])
    )
    torch.testing.assert_close(
        project_onto_simplex(torch.tensor([1.0, 0.0, -0.5])), torch.tensor([1.0, 0.0, 0.0])
    )


def test_hand_computed_cases() -> None:
    # Uniform shift: [2, 2] -> t = 1.5 -> [0.5, 0.5]; one dominant entry -> one-hot.
    torch.testing.assert_close(
        project_onto_simplex(torch.tensor([2.0, 2.0])), torch.full((2,), 0.5)
    )
    torch.testing.assert_close(
        project_onto_simplex(torch.tensor([5.0, 1.0, 0.0])), torch.tensor([1.0, 0.0, 0.0])
    )
    # [0.8, 0.6, -1]: the top two share the excess 0.4: t = 0.2 -> [0.6, 0.4, 0].
    torch.testing.assert_close(
        project_onto_simplex(torch.tensor([0.8, 0.6, -1.0])), torch.tensor([0.6, 0.4, 0.0])
    )
    torch.testing.assert_close(project_onto_simplex(torch.tensor([-3.0])), torch.tensor([1.0]))


def test_points_of_the_simplex_are_fixed() -> None:
    w = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64)
    torch.testing.assert_close(project_onto_simplex(w), w)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 1e4]),
)
def test_matches_bisection(m: int, seed: int, scale: float) -> None:
    y = scale * torch.randn(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = project_onto_simplex(y)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(w, _projection_by_bisection(y), rtol=0, atol=1e-9 * max(1, scale))


def test_batched_and_preserves_dtype() -> None:
    y = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))
    w = project_onto_simplex(y)
    assert w.shape == y.shape and w.dtype == y.dtype
    for index in range(4):
        for row in range(5):
            torch.testing.assert_close(w[index, row], project_onto_simplex(y[index, row]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_and_nan(dtype: torch.dtype) -> None:
    torch.testing.assert_close(
        project_onto_simplex(torch.ones(4, dtype=dtype)), torch.full((4,), 0.25, dtype=dtype)
    )
    assert project_onto_simplex(torch.tensor([float("nan"), 0.1], dtype=dtype)).isnan().any()


def test_large_common_offset_is_not_rounded_away() -> None:
    # In float32, -1e7 - 1 rounds to -1e7 in the partial sums unless the offset is removed first.
    y = torch.full((4,), -1e7)
    torch.testing.assert_close(project_onto_simplex(y), torch.full((4,), 0.25))
    y = torch.tensor([3e15, -2e16, 1e16, 5e14])
    torch.testing.assert_close(project_onto_simplex(y), torch.tensor([0.0, 0.0, 1.0, 0.0]))
