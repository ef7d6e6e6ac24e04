"""The hard-input bank: named matrices (and loss values) on which every aggregator, weighting and
scalarizer of the registries must behave, in float64, float32, bfloat16 and float16.

Each case is built in float64 and described by what the checks need to know about it: whether the
condition number of its Gramian is at most 1e3 (where results in low precision are compared with
float64), whether its rows are Pareto-stationary (0 in their convex hull), and whether its row
norms are within a factor of 100. Cast to a low-precision dtype, a finite case may stop being
finite (``1e8`` overflows float16): the checks look at the cast input, never at the name.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}

# Relative error allowed against the float64 result on well-conditioned inputs.
ACCURACY = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Conflict allowed, relative to ||J_i|| ||d|| (or to ||J|| ||d|| when the row norms are far apart).
CONFLICT = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
MAX_COND = 1e3
CLOSE_ROW_NORMS = 100.0


@dataclass(frozen=True)
class Case:
    """One hard input, in float64."""

    name: str
    matrix: Tensor  # [m, n]

    @property
    def m(self) -> int:
        return self.matrix.shape[0]

    @property
    def well_conditioned(self) -> bool:
        """Whether cond(J Jᵀ) <= 1e3 (a zero or non-finite matrix is not)."""
        if not torch.isfinite(self.matrix).all() or not self.matrix.any():
            return False
        singular = torch.linalg.svdvals(self.matrix)
        if singular.numel() < self.m or singular[-1] == 0:
            return False
        return bool((singular[0] / singular[-1]) ** 2 <= MAX_COND)

    @property
    def close_row_norms(self) -> bool:
        """Whether the row norms are within a factor of 100 (no zero row)."""
        norms = self.matrix.norm(dim=1)
        return bool(norms.min() > 0 and norms.max() <= CLOSE_ROW_NORMS * norms.min())


def _random(m: int, n: int, seed: int) -> Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _of_rank(m: int, n: int, rank: int, seed: int) -> Tensor:
    return _random(m, rank, seed) @ _random(rank, n, seed + 1)


def _pareto_stationary_triangle() -> Tensor:
    """Three unit rows at 120 degrees: their mean is 0, only d = 0 conflicts with none."""
    angles = torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64) * torch.pi / 3
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def _pareto_stationary_partial() -> Tensor:
    """Rows 0 to 2 have 0 in their convex hull; row 3 adds a free direction (d along e_2)."""
    return torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, -1.0, 0.0], [0.3, -0.2, 1.0]],
        dtype=torch.float64,
    )


def _with(matrix: Tensor, row: int, column: int, value: float) -> Tensor:
    matrix = matrix.clone()
    matrix[row, column] = value
    return matrix


def matrix_cases() -> list[Case]:
    """The matrices of the bank (kept small: the whole bank runs in seconds)."""
    base = _random(4, 7, 0)
    scales = torch.tensor([1e-6, 1.0, 1e3, 1e6], dtype=torch.float64).unsqueeze(1)
    moderate = torch.tensor([1.0, 10.0, 0.1, 50.0], dtype=torch.float64).unsqueeze(1)
    cases = [
        Case("zero", torch.zeros(4, 7, dtype=torch.float64)),
        Case("random", base),
        Case("rank_deficient", _of_rank(4, 7, 2, 1)),
        Case("rank_one", _of_rank(4, 7, 1, 2)),
        Case("duplicated_rows", torch.cat([base[:2], base[:2]])),
        Case("opposite_rows", torch.cat([base[:1], -base[:1], base[2:]])),
        Case("one_zero_row", torch.cat([torch.zeros(1, 7, dtype=torch.float64), base[1:]])),
        Case("pareto_stationary", _pareto_stationary_triangle()),
        Case("pareto_stationary_partial", _pareto_stationary_partial()),
        Case("m1", _random(1, 7, 3)),
        Case("n1", _random(4, 1, 4)),
        Case("m128", _random(128, 256, 5)),  # cond(J Jᵀ) about 30
        Case("n4096", _random(4, 4096, 6)),
        Case("scale_1e-8", 1e-8 * base),
        Case("scale_1e8", 1e8 * base),
        Case("mixed_row_scales", scales * base),
        Case("moderate_row_scales", moderate * base),
        Case("nan", _with(base, 1, 2, float("nan"))),
        Case("inf", _with(base, 2, 0, float("inf"))),
        Case("minus_inf", _with(base, 0, 6, -float("inf"))),
    ]
    return cases


def value_cases() -> list[tuple[str, Tensor]]:
    """Loss values for the scalarizers (float64, positive unless named otherwise)."""
    values = 0.5 + 2.0 * torch.rand(4, generator=torch.Generator().manual_seed(0))
    values = values.to(torch.float64)
    return [
        ("zero", torch.zeros(4, dtype=torch.float64)),
        ("random", values),
        ("m1", values[:1].clone()),
        ("m128", 0.5 + torch.rand(128, generator=torch.Generator().manual_seed(1)).double()),
        ("scale_1e-8", 1e-8 * values),
        ("scale_1e8", 1e8 * values),
        ("mixed_scales", values * torch.tensor([1e-6, 1.0, 1e3, 1e6], dtype=torch.float64)),
        ("nan", torch.cat([values[:3], torch.tensor([float("nan")], dtype=torch.float64)])),
        ("inf", torch.cat([values[:3], torch.tensor([float("inf")], dtype=torch.float64)])),
    ]
