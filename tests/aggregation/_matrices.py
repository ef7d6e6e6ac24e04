"""Matrices shared by the aggregation tests: the spec's examples and a bank of hard inputs."""

import torch
from torch import Tensor

J_A = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
J_B = torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.5, 2.0, -1.0, 1.0], [-1.0, 0.5, 1.0, 2.0]])
J_B2 = torch.tensor([[0.0, 1.0, 2.0, -1.0], [1.0, 1.0, -1.0, 0.5], [2.0, -0.5, 0.0, 1.0]])
J_C = torch.tensor([[1.0, 0.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 0.0], [0.0, -1.0, 1.0, -0.5]])
ZERO = torch.zeros(2, 3)
ONE = torch.tensor([[3.0, -4.0, 1.0]])
ZR = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -1.0]])


def _random_of_rank(m: int, n: int, rank: int, generator: torch.Generator) -> Tensor:
    left = torch.randn(m, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, n, generator=generator, dtype=torch.float64)
    return left @ right


def hard_matrices(m: int, n: int = 7, seed: int = 0) -> dict[str, Tensor]:
    """Named ``[m, n]`` float64 matrices on which every aggregator must stay finite."""
    g = torch.Generator().manual_seed(seed)
    bank: dict[str, Tensor] = {"zero": torch.zeros(m, n, dtype=torch.float64)}
    full = torch.randn(m, n, generator=g, dtype=torch.float64)
    bank["random"] = full
    bank["rank_one"] = _random_of_rank(m, n, 1, g)
    if m >= 2:
        bank["rank_deficient"] = _random_of_rank(m, n, max(1, m - 1), g)
        bank["duplicated_rows"] = torch.cat([full[:1], full[:-1]])
        bank["opposite_rows"] = torch.cat([full[:1], -full[:1], full[2:]])
        bank["one_zero_row"] = torch.cat([torch.zeros(1, n, dtype=torch.float64), full[1:]])
    for scale in (1e-8, 1e-4, 1e4, 1e8):
        bank[f"scaled_{scale:g}"] = scale * full
    return bank
