"""Two processes (gloo, CPU) train with MTLEngine(data_parallel=True): every process ends with
the same parameters, those of a single-process simulation of the documented rule (weights from
the mean of the local Gramians, with the first process's generator)."""

from __future__ import annotations

import pytest
import torch

from tests._gloo import needs_gloo, run_processes
from tests.autogram._mtl_data_parallel import SCENARIOS, reference, worker

WORLD_SIZE = 2
TIMEOUT_S = 120

pytestmark = needs_gloo


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("mtl_ddp")
    return run_processes(worker, directory, WORLD_SIZE, TIMEOUT_S)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_process_matches_the_simulation(
    results: list[dict[str, torch.Tensor]], name: str
) -> None:
    expected = reference(name, WORLD_SIZE)
    for per_rank in results:
        torch.testing.assert_close(per_rank[name], expected, rtol=1e-6, atol=1e-8)


def test_the_rule_is_not_the_gramian_of_the_mean_jacobian() -> None:
    # With one process, the simulation is jac_to_grad on the whole batch; with two it differs:
    # the test above would not pass by accident with the exact Gramian.
    assert not torch.allclose(reference("upgrad-ddp", 1), reference("upgrad-ddp", WORLD_SIZE))
