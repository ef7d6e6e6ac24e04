"""Two processes (gloo, CPU) train with DistributedDataParallel and torchjd.distributed.

All the scenarios run in one pair of processes (a module-scoped fixture); each test checks one
property of their results against a single-process run on the whole batch.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests._gloo import needs_gloo, run_processes
from tests.distributed._scenarios import (
    BATCH,
    CONTROLS,
    N_TASKS,
    SCENARIOS,
    UNSHARED_RNG_JACOBIAN,
    UNSHARED_RNG_UPDATE,
    UNSYNCED,
    Scenario,
    flat_params,
    make_model,
    reference,
    worker,
)

WORLD_SIZE = 2
TIMEOUT_S = 120

pytestmark = needs_gloo


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("ddp")
    return run_processes(worker, directory, WORLD_SIZE, TIMEOUT_S)


@pytest.fixture(scope="module")
def references() -> dict[str, torch.Tensor]:
    return {s.name: reference(s) for s in [*SCENARIOS, *CONTROLS]}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_every_rank_ends_with_the_same_parameters(
    results: list[dict[str, Any]], scenario: Scenario
) -> None:
    first = results[0][scenario.name]["params"]
    for other in results[1:]:
        assert torch.equal(other[scenario.name]["params"], first)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_parameters_equal_the_single_process_run(
    results: list[dict[str, Any]], references: dict[str, torch.Tensor], scenario: Scenario
) -> None:
    expected = references[scenario.name]
    initial = flat_params(make_model(scenario.kind))
    assert not torch.allclose(expected, initial, atol=1e-4)  # the training moved the parameters
    for result in results:
        torch.testing.assert_close(result[scenario.name]["params"], expected, rtol=0, atol=1e-5)


# Controls of the sharing of the generator state: the processes' generators are seeded differently.
def test_unshared_generators_make_replicas_diverge(results: list[dict[str, Any]]) -> None:
    # Each process aggregates the same global Jacobian with its own random weights.
    params = [r[UNSHARED_RNG_JACOBIAN.name]["params"] for r in results]
    assert not torch.allclose(params[0], params[1], atol=1e-4)


def test_unshared_generators_miss_the_single_process_run(
    results: list[dict[str, Any]], references: dict[str, torch.Tensor]
) -> None:
    # With the "update" strategy, the sum of w_rᵀ J_r is the same everywhere, but the weights
    # differ from process to process, so it is not the single-process update.
    expected = references[UNSHARED_RNG_UPDATE.name]
    for result in results:
        assert not torch.allclose(result[UNSHARED_RNG_UPDATE.name]["params"], expected, atol=1e-4)


def test_unsynchronised_jac_to_grad_warns_and_diverges(results: list[dict[str, Any]]) -> None:
    for result in results:
        assert result[UNSYNCED.name]["warnings"] == ["UnsynchronizedJacobianWarning"] * 3
    params = [r[UNSYNCED.name]["params"] for r in results]
    assert not torch.allclose(params[0], params[1], atol=1e-4)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_synchronised_aggregation_does_not_warn(
    results: list[dict[str, Any]], scenario: Scenario
) -> None:
    for result in results:
        assert result[scenario.name]["warnings"] == []


def test_sync_jac_marks_the_jacobians(results: list[dict[str, Any]]) -> None:
    for result in results:
        assert result["synced-no-warning"] == []


def test_ddp_leaves_head_gradients_of_mtl_backward_local(results: list[dict[str, Any]]) -> None:
    # The reason for `grad_params`: the gradients that mtl_backward gives the heads come from
    # torch.autograd.grad, which does not run the reducer hooks of DistributedDataParallel.
    first, second = (r["mtl-upgrad-auto"]["local_head_grads"] for r in results)
    assert not torch.allclose(first, second)


# Sizes of the models of the scenarios, for the expected payloads of the collectives.
_MTL_SHARED = 5 * 8 + 8 + 8 * 6 + 6  # trunk
_MTL_HEADS = N_TASKS * (6 + 1)
_IWRM_PARAMS = 5 * 8 + 8 + 8 * 3 + 3
_RNG = torch.get_rng_state().numel()


def _expected_calls(name: str) -> list[tuple[str, int]]:
    n, h, r = _MTL_SHARED, _MTL_HEADS, WORLD_SIZE
    m = N_TASKS
    c, hh = math.ceil(n / r), math.ceil(h / r)
    if name == "mtl-mean-auto":  # the traffic of DistributedDataParallel: N + H
        return [("all_reduce", n + h)]
    if name == "mtl-upgrad-auto":  # on gloo, an all-reduce of the Jacobians
        return [("all_reduce", m * n + h + _RNG)]
    if name == "mtl-upgrad-gramian":
        return [
            ("reduce_scatter", r * (m * c + hh)),
            ("all_reduce", m * m + _RNG),
            ("all_gather", c + hh),
        ]
    if name == "mtl-random-auto":
        return [("all_reduce", _RNG), ("all_reduce", n + h)]
    if name == "mtl-mean-grouped-one-call":  # one all-reduce for every group
        return [("all_reduce", n + h)]
    if name == "mtl-gradvac-grouped-one-call-gramian":  # each layer's columns sharded on its own
        columns = [math.ceil((5 * 8 + 8) / r), math.ceil((8 * 6 + 6) / r)]
        return [
            ("reduce_scatter", r * (m * sum(columns) + hh)),
            ("all_reduce", 2 * m * m + _RNG),
            ("all_gather", sum(columns) + hh),
        ]
    n, m_all = _IWRM_PARAMS, BATCH
    c = math.ceil(n / r)
    m_local = BATCH // r
    if name == "iwrm-upgrad-auto":
        return [("all_to_all", r * m_local * c), ("all_reduce", m_all**2 + _RNG), ("all_gather", c)]
    if name == "iwrm-upgrad-jacobian":
        return [("all_gather", m_local * n + _RNG)]
    if name == "iwrm-upgrad-grouped-one-call":
        columns = [math.ceil((5 * 8 + 8) / r), math.ceil((8 * 3 + 3) / r)]
        return [
            ("all_to_all", r * m_local * sum(columns)),
            ("all_reduce", 2 * m_all**2 + _RNG),
            ("all_gather", sum(columns)),
        ]
    raise KeyError(name)


@pytest.mark.parametrize(
    "name",
    [
        "mtl-mean-auto",
        "mtl-upgrad-auto",
        "mtl-upgrad-gramian",
        "mtl-random-auto",
        "iwrm-upgrad-auto",
        "iwrm-upgrad-jacobian",
        "mtl-gradvac-grouped-one-call-gramian",
        "mtl-mean-grouped-one-call",
        "iwrm-upgrad-grouped-one-call",
    ],
)
def test_collectives_per_step(results: list[dict[str, Any]], name: str) -> None:
    expected = _expected_calls(name)
    for result in results:
        for calls in result[name]["calls"]:
            assert calls == expected
