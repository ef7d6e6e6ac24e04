"""A new aggregator written in one place works with every entry point.

``NormalisedMean`` below averages the rows after scaling each to unit norm: its weights
``w_i = 1 / (m ‖g_i‖)`` depend only on the diagonal of the Gramian. It is defined here, in this
test module alone, exactly as a user (or a contributor, in its own module) would write it, and
nothing else in the library knows about it: the pipeline reads its declarations, and ``ENTRIES``
below puts it in the shared property tests of the registry.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.testing import assert_close

from torchjd import distributed
from torchjd.aggregation import GramianWeightedAggregator, Weighting
from torchjd.autojac import jac_to_grad
from torchjd.grouping import GroupedAggregator
from torchjd.linalg import PSDMatrix

from ._entry import Entry


class NormalisedMeanWeighting(Weighting[PSDMatrix]):
    calls = 0  # calls of the batched entry point, to see the batching

    def forward(self, gramian: Tensor, /) -> Tensor:
        return self._forward_grouped([self], gramian.unsqueeze(0))[0]

    @classmethod
    def _forward_grouped(cls, weightings: Sequence[Weighting], gramians: Tensor) -> Tensor:
        cls.calls += 1
        norms = gramians.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
        return torch.where(norms == 0, 0.0, 1 / (gramians.shape[-1] * norms))


class NormalisedMean(GramianWeightedAggregator):
    def __init__(self) -> None:
        super().__init__(NormalisedMeanWeighting())


ENTRIES = [
    Entry("NormalisedMean(test)", NormalisedMean, permutation_invariant=True, differentiable=True)
]


def _expected(matrix: Tensor) -> Tensor:
    """By hand: the mean of the rows scaled to unit norm."""
    return (matrix / matrix.norm(dim=1, keepdim=True)).mean(dim=0)


def _params(shapes: list[tuple[int, ...]], m: int, seed: int) -> tuple[list[Tensor], Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    for p in params:
        p.jac = torch.randn(m, *p.shape, generator=generator, dtype=torch.float64).float()
    matrix = torch.cat([p.jac.reshape(m, -1) for p in params], dim=1)
    return params, matrix


def _flat_grads(params: list[Tensor]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def test_the_declarations_are_inherited() -> None:
    aggregator = NormalisedMean()
    assert aggregator.need.value == "gramian"
    assert NormalisedMeanWeighting.batched()
    assert not aggregator.randomized


def test_jac_to_grad() -> None:
    params, matrix = _params([(2, 3), (4,)], m=3, seed=0)
    NormalisedMeanWeighting.calls = 0
    weights = jac_to_grad(params, NormalisedMean())
    assert_close(_flat_grads(params), _expected(matrix))
    assert_close(weights, 1 / (3 * matrix.norm(dim=1)))
    assert NormalisedMeanWeighting.calls == 1


def test_grouped_aggregator_weighs_every_group_in_one_call() -> None:
    params, matrix = _params([(2, 3), (4,), (5,)], m=3, seed=1)
    grouped = GroupedAggregator([[params[0]], [params[1]], [params[2]]], NormalisedMean)
    NormalisedMeanWeighting.calls = 0
    grouped.jac_to_grad()
    assert NormalisedMeanWeighting.calls == 1  # one batched call for the three groups
    expected = torch.cat([_expected(block) for block in matrix.split([6, 4, 5], dim=1)])
    assert_close(_flat_grads(params), expected)


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for strategy in ["gramian", "jacobian"]:
            params, _ = _params([(2, 3), (4,)], m=3, seed=10 + rank)  # each rank: its own J_r
            distributed.jac_to_grad(params, NormalisedMean(), strategy=strategy)
            results[strategy] = _flat_grads(params)
            params, _ = _params([(2, 3), (4,)], m=3, seed=10 + rank)
            grouped = GroupedAggregator([[params[0]], [params[1]]], NormalisedMean)
            distributed.jac_to_grad(grouped, strategy=strategy)
            results[f"grouped-{strategy}"] = _flat_grads(params)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_torchjd_distributed() -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_worker, args=(2, init_file, out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    # The global Jacobian is the mean of the local ones (rows="mean").
    matrix = (_params([(2, 3), (4,)], 3, seed=10)[1] + _params([(2, 3), (4,)], 3, seed=11)[1]) / 2
    whole = _expected(matrix)
    per_group = torch.cat([_expected(block) for block in matrix.split([6, 4], dim=1)])
    for result in results:
        for strategy in ["gramian", "jacobian"]:
            assert_close(result[strategy], whole)
            assert_close(result[f"grouped-{strategy}"], per_group)
