"""The exchanges of torchjd.distributed against the mathematics, with simulated process groups.

The collectives are replaced by in-memory ones between threads (one thread per simulated
process), so that group sizes other than two, uneven shards and mixed dtypes are covered without
spawning processes. The expected result is :func:`torchjd.autojac.jac_to_grad` applied in one
process to the global Jacobian: the mean of the local ones, or their rows stacked in rank order.
The random generator is shared by the threads, so only deterministic aggregators are used here
(the sharing of the generator state is tested with real processes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torchjd.distributed._exchange as exchange
import torchjd.distributed._jac_to_grad as distributed_jac_to_grad
import torchjd.distributed._sync_jac as distributed_sync_jac
from torchjd import distributed
from torchjd.aggregation import MGDA, ConFIG, Constant, DualProj, Mean, Sum, UPGrad
from torchjd.autojac import jac_to_grad

SHAPES = [(3,), (2, 5), (), (3,)]  # 17 entries: uneven shards for 2 or 3 processes
GRAD_SHAPES = [(2, 3), (1,)]  # 7 entries
ROWS = 6  # rows of the global Jacobian


class _Group:
    def __init__(self, size: int, backend: str) -> None:
        self.size = size
        self.backend = backend
        self.barrier = threading.Barrier(size, timeout=30)
        self.posted: list[Tensor | None] = [None] * size
        self.called: list[str] = []  # the collectives, as seen by the first process


class _Member:
    """What a simulated process passes as ``group``."""

    def __init__(self, group: _Group, rank: int) -> None:
        self.group = group
        self.rank = rank


def _everyone(member: _Member, value: Tensor, name: str) -> list[Tensor]:
    group = member.group
    if member.rank == 0:
        group.called.append(name)
    group.posted[member.rank] = value.clone()
    group.barrier.wait()
    values = [v for v in group.posted if v is not None]
    group.barrier.wait()
    return values


def _all_reduce(buffer: Tensor, member: _Member) -> None:
    buffer.copy_(torch.stack(_everyone(member, buffer, "all_reduce")).sum(dim=0))


def _reduce_scatter(output: Tensor, input: Tensor, member: _Member) -> None:
    posted = _everyone(member, input, "reduce_scatter")
    chunks = [v.view(member.group.size, -1)[member.rank] for v in posted]
    output.copy_(torch.stack(chunks).sum(dim=0))


def _all_gather(output: Tensor, input: Tensor, member: _Member) -> None:
    output.copy_(torch.cat(_everyone(member, input, "all_gather")))


def _all_to_all(output: Tensor, input: Tensor, member: _Member) -> None:
    posted = _everyone(member, input, "all_to_all")
    chunks = [v.view(member.group.size, -1)[member.rank] for v in posted]
    output.copy_(torch.cat(chunks))


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange, "all_reduce", _all_reduce)
    monkeypatch.setattr(exchange, "reduce_scatter", _reduce_scatter)
    monkeypatch.setattr(exchange, "all_gather", _all_gather)
    monkeypatch.setattr(exchange, "all_to_all", _all_to_all)

    def rank_and_size(member: _Member) -> tuple[int, int]:
        return member.rank, member.group.size

    monkeypatch.setattr(distributed_jac_to_grad, "group_rank_and_size", rank_and_size)
    monkeypatch.setattr(distributed_sync_jac, "group_rank_and_size", rank_and_size)
    monkeypatch.setattr(distributed_jac_to_grad, "backend", lambda member: member.group.backend)


def _run(size: int, work: Callable[[int, _Member], Any], group: _Group | None = None) -> list[Any]:
    """Run ``work(rank, member)`` in ``size`` threads; return the results in rank order."""
    group = group or _Group(size, backend="nccl")
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = work(rank, _Member(group, rank))
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _local_jacobians(size: int, m: int, dtypes: list[torch.dtype]) -> list[list[Tensor]]:
    generator = torch.Generator().manual_seed(size * 10 + m)
    return [
        [torch.randn(m, *shape, generator=generator).to(dt) for shape, dt in zip(SHAPES, dtypes)]
        for _ in range(size)
    ]


def _local_grads(size: int) -> list[list[Tensor]]:
    generator = torch.Generator().manual_seed(size)
    return [
        [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in GRAD_SHAPES]
        for _ in range(size)
    ]


def _global(local: list[list[Tensor]], rows: str) -> list[Tensor]:
    per_tensor = list(zip(*local))
    if rows == "mean":
        return [torch.stack(js).mean(dim=0) for js in per_tensor]
    return [torch.cat(js) for js in per_tensor]


def _expected(
    jacobians: list[Tensor], make_aggregator: Callable[[], nn.Module], dtypes: list[torch.dtype]
) -> tuple[list[Tensor], Tensor | None]:
    tensors = [torch.zeros(s, dtype=dt, requires_grad=True) for s, dt in zip(SHAPES, dtypes)]
    for t, j in zip(tensors, jacobians):
        t.jac = j.clone()
    weights = jac_to_grad(tensors, make_aggregator())
    return [t.grad for t in tensors], weights


def _reduced_grads(local: list[list[Tensor]], rows: str) -> list[Tensor]:
    per_tensor = [torch.stack(gs) for gs in zip(*local)]
    return [g.mean(dim=0) if rows == "mean" else g.sum(dim=0) for g in per_tensor]


F64 = [torch.float64] * len(SHAPES)
MIXED = [torch.float32, torch.float64, torch.float32, torch.float64]

CASES = [
    # (aggregator, strategy)
    (UPGrad, "auto"),
    (UPGrad, "jacobian"),
    (UPGrad, "gramian"),
    (MGDA, "gramian"),
    (DualProj, "auto"),
    (Mean, "auto"),
    (Mean, "jacobian"),
    (Sum, "update"),
    (lambda: Constant(torch.arange(1.0, ROWS + 1.0, dtype=torch.float64)), "update"),
    (ConFIG, "auto"),
]


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("rows", ["mean", "stack"])
@pytest.mark.parametrize(("make_aggregator", "strategy"), CASES)
def test_jac_to_grad_aggregates_the_global_jacobian(
    simulated: None,
    size: int,
    rows: str,
    make_aggregator: Callable[[], nn.Module],
    strategy: str,
) -> None:
    m = ROWS if rows == "mean" else ROWS // size  # local rows
    local = _local_jacobians(size, m, F64)
    local_grads = _local_grads(size)
    expected_grads, expected_weights = _expected(_global(local, rows), make_aggregator, F64)
    expected_reduced = _reduced_grads(local_grads, rows)

    def work(rank: int, member: _Member) -> tuple[list[Tensor], Tensor | None, list[Tensor]]:
        tensors = [torch.zeros(shape, dtype=torch.float64, requires_grad=True) for shape in SHAPES]
        for t, j in zip(tensors, local[rank]):
            t.jac = j.clone()
        heads = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in GRAD_SHAPES]
        for h, g in zip(heads, local_grads[rank]):
            h.grad = g.clone()
        weights = distributed.jac_to_grad(
            tensors,
            make_aggregator(),
            grad_params=heads,
            rows=rows,
            strategy=strategy,
            group=member,
            share_rng_state=False,
        )
        assert all(not hasattr(t, "jac") for t in tensors)
        return [t.grad for t in tensors], weights, [h.grad for h in heads]

    for grads, weights, reduced in _run(size, work):
        for got, expected in zip(grads, expected_grads):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        if expected_weights is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-9)
        for got, expected in zip(reduced, expected_reduced):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["gramian", "jacobian", "update"])
@pytest.mark.parametrize("rows", ["mean", "stack"])
def test_every_process_gets_exactly_the_same_update(
    simulated: None, strategy: str, rows: str
) -> None:
    size, m = 3, 3
    local = _local_jacobians(size, m, [torch.float32] * len(SHAPES))
    make_aggregator = Mean if strategy == "update" else UPGrad

    def work(rank: int, member: _Member) -> list[Tensor]:
        tensors = [torch.zeros(shape, requires_grad=True) for shape in SHAPES]
        for t, j in zip(tensors, local[rank]):
            t.jac = j.clone()
        distributed.jac_to_grad(
            tensors, make_aggregator(), rows=rows, strategy=strategy, group=member
        )
        return [t.grad for t in tensors]

    first, *others = _run(size, work)
    for other in others:
        assert all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("strategy", ["gramian", "jacobian"])
def test_mixed_dtypes_keep_each_tensor_dtype(simulated: None, strategy: str) -> None:
    size, m = 3, 4
    local = _local_jacobians(size, m, MIXED)
    expected_grads, _ = _expected(_global(local, "mean"), UPGrad, MIXED)

    def work(rank: int, member: _Member) -> list[Tensor]:
        tensors = [torch.zeros(s, dtype=dt, requires_grad=True) for s, dt in zip(SHAPES, MIXED)]
        for t, j in zip(tensors, local[rank]):
            t.jac = j.clone()
        distributed.jac_to_grad(tensors, UPGrad(), strategy=strategy, group=member)
        return [t.grad for t in tensors]

    for grads in _run(size, work):
        for got, expected, dt in zip(grads, expected_grads, MIXED):
            assert got.dtype == dt
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_retain_jac_keeps_the_local_jacobians(simulated: None) -> None:
    local = _local_jacobians(2, 3, F64)

    def work(rank: int, member: _Member) -> bool:
        tensors = [torch.zeros(shape, dtype=torch.float64, requires_grad=True) for shape in SHAPES]
        for t, j in zip(tensors, local[rank]):
            t.jac = j.clone()
        distributed.jac_to_grad(tensors, UPGrad(), retain_jac=True, group=member)
        return all(torch.equal(t.jac, j) for t, j in zip(tensors, local[rank]))

    assert all(_run(2, work))


@pytest.mark.parametrize("rows", ["mean", "stack"])
def test_sync_jac_replaces_jac_by_the_global_jacobian(simulated: None, rows: str) -> None:
    size, m = 3, 2
    local = _local_jacobians(size, m, MIXED)
    local_grads = _local_grads(size)
    expected = _global(local, rows)
    expected_reduced = _reduced_grads(local_grads, rows)

    def work(rank: int, member: _Member) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        tensors = [torch.zeros(s, dtype=dt, requires_grad=True) for s, dt in zip(SHAPES, MIXED)]
        for t, j in zip(tensors, local[rank]):
            t.jac = j.clone()
        heads = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in GRAD_SHAPES]
        grad_objects = []
        for h, g in zip(heads, local_grads[rank]):
            h.grad = g.clone()
            grad_objects.append(h.grad)
        with distributed.sync_jac(tensors, grad_params=heads, rows=rows, group=member):
            pass
        # The .grad fields are updated in place: the same tensor objects hold the result.
        assert all(h.grad is g for h, g in zip(heads, grad_objects))
        return [t.jac for t in tensors], [h.grad for h in heads], tensors

    for jacobians, reduced, _ in _run(size, work):
        for got, want, dt in zip(jacobians, expected, MIXED):
            assert got.dtype == dt
            torch.testing.assert_close(got, want.to(dt), rtol=1e-6, atol=1e-7)
        for got, want in zip(reduced, expected_reduced):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("backend", "rows", "expected"),
    [
        ("nccl", "mean", ["reduce_scatter", "all_reduce", "all_gather"]),
        ("gloo", "mean", ["all_reduce"]),  # gloo's reduce-scatter is slower than its all-reduce
        ("gloo", "stack", ["all_to_all", "all_reduce", "all_gather"]),
    ],
)
def test_auto_strategy_for_a_gramian_aggregator(
    simulated: None, backend: str, rows: str, expected: list[str]
) -> None:
    local = _local_jacobians(2, 3, F64)

    def work(rank: int, member: _Member) -> None:
        tensors = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
        for t, j in zip(tensors, local[rank]):
            t.jac = j.clone()
        distributed.jac_to_grad(tensors, UPGrad(), rows=rows, group=member)

    group = _Group(2, backend)
    _run(2, work, group)
    assert group.called == expected
