"""Two processes with per-task label counts agree with one process on the union of the batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

from tests._gloo import needs_gloo, run_processes
from tests.distributed._missing_tasks import CASES, reference, worker

WORLD_SIZE = 2
TIMEOUT_S = 120

pytestmark = needs_gloo


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("missing")
    return run_processes(worker, directory, WORLD_SIZE, TIMEOUT_S)


@pytest.mark.parametrize("name", list(CASES))
def test_label_counts_give_the_step_on_the_union_of_the_batches(
    results: list[dict[str, Any]], name: str
) -> None:
    expected = reference(name)
    for rank_results in results:
        for got, want in zip(rank_results[name], expected):
            assert torch.isfinite(got).all()
            assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_ranks_agree_bit_for_bit(results: list[dict[str, Any]]) -> None:
    for name in CASES:
        for a, b in zip(results[0][name], results[1][name]):
            assert torch.equal(a, b)


def test_counts_of_a_fully_labelled_batch_change_nothing(results: list[dict[str, Any]]) -> None:
    for rank_results in results:
        with_counts, without = (
            rank_results["all-upgrad-counts"],
            rank_results["all-upgrad-no-counts"],
        )
        assert all(torch.equal(a, b) for a, b in zip(with_counts, without))
