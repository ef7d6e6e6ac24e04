"""Successive ``torch.randperm(n)`` draws on the CPU generator, made with one random call.

PCGrad and GradVac draw one permutation per task with ``torch.randperm`` (TorchJD's draws, so
that a seed gives the same numbers). A call of ``torch.randperm`` costs microseconds of fixed
overhead, more than the permutation: in a loop of one small aggregation per parameter, or for a
batch of groups, these calls are a good part of the step.

On the CPU, ``torch.randperm(n)`` (for small ``n``) fills ``0, ..., n - 1`` and, for
``s = 0, ..., n - 2``, swaps entry ``s`` with entry ``s + r mod (n - s)``, ``r`` being the next
32-bit output of the generator. ``Tensor.random_(0, R)`` with ``R < 2^32`` draws ``r mod R`` from
the same outputs, one per entry, in order. With ``R`` a multiple of ``2, ..., n``,
``(r mod R) mod k = r mod k``: the same swaps can be replayed from one such draw, leaving the
generator in the same state. Whether this torch build draws so is checked once per process
against ``torch.randperm`` on a private generator; if it does not, ``torch.randperm`` is called.
"""

import math
from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor

# Above this n, the multiple of 2, ..., n reaches 2^32 (lcm(2, ..., 23) > 2^32).
_MAX_N = 22
_replays_randperm: bool | None = None


def randperm_lists(count: int, n: int) -> list[list[int]]:
    """``[torch.randperm(n).tolist() for _ in range(count)]`` on the global CPU generator, with the
    same values and the same state of the generator afterwards."""
    return permuted([range(n)] * count)


def permuted(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each sequence (all of one length ``n``) permuted by its own ``torch.randperm(n)``, drawn in
    turn on the global CPU generator: ``[[seq[k] for k in torch.randperm(n).tolist()] for seq in
    sequences]``, with the same state of the generator afterwards."""
    count = len(sequences)
    n = len(sequences[0]) if count else 0
    if n <= 1:
        return [list(seq) for seq in sequences]  # randperm(n <= 1) draws nothing
    if n > _MAX_N or not _check_replay():
        return [[seq[k] for k in torch.randperm(n).tolist()] for seq in sequences]
    steps = _plan(n)[1]
    draws = iter(_draws(count, n, None).tolist())
    result = []
    for seq in sequences:
        # Swapping the entries of seq is swapping the entries of range(n), then reading seq there.
        permutation = list(seq)
        # zip stops at the end of steps, before taking a draw of the next sequence.
        for (s, k), r in zip(steps, draws):
            t = s + r % k
            permutation[s], permutation[t] = permutation[t], permutation[s]
        result.append(permutation)
    return result


@cache
def _plan(n: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """The modulus of :func:`_draws` and the swaps ``(s, n - s)`` of ``randperm(n)``, made once
    (a call of :func:`permuted` is a few microseconds)."""
    return math.lcm(*range(2, n + 1)), tuple((s, n - s) for s in range(n - 1))


def randperm_rows(count: int, n: int) -> Tensor:
    """``torch.stack([torch.randperm(n) for _ in range(count)])`` (shape ``[count, n]``, int64)
    on the global CPU generator, with the same values and the same state of the generator
    afterwards: the swaps are replayed on all rows at once."""
    if n <= 1:  # randperm(0) and randperm(1) draw nothing (GradVac's two tasks, in every group)
        return torch.arange(n).repeat(count, 1)
    if count == 0 or n > _MAX_N or not _check_replay():
        rows = [torch.randperm(n) for _ in range(count)]
        return torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.long)
    draws = _draws(count, n, None).view(count, n - 1)
    rows = torch.arange(n).repeat(count, 1)
    for s in range(n - 1):
        target = draws[:, s : s + 1].remainder(n - s).add_(s)  # [count, 1]
        swapped = rows.gather(1, target)
        rows.scatter_(1, target, rows[:, s : s + 1].clone())
        rows[:, s : s + 1] = swapped
    return rows


def _draws(count: int, n: int, generator: torch.Generator | None) -> Tensor:
    """The ``count * (n - 1)`` generator outputs of ``count`` successive ``randperm(n)``, each
    reduced modulo a multiple of ``2, ..., n``."""
    modulus = _plan(n)[0]
    return torch.empty(count * (n - 1), dtype=torch.int64).random_(0, modulus, generator=generator)


def _shuffled(n: int, draws: list[int]) -> list[int]:
    """The permutation that ``torch.randperm(n)`` builds from these outputs."""
    permutation = list(range(n))
    for s, r in enumerate(draws):
        t = s + r % (n - s)
        permutation[s], permutation[t] = permutation[t], permutation[s]
    return permutation


def _check_replay() -> bool:
    """Whether this torch build's ``randperm`` is replayed exactly (checked once per process on a
    private generator: the values and the generator's state afterwards)."""
    global _replays_randperm
    if _replays_randperm is None:
        _replays_randperm = _replays(torch.Generator().manual_seed(20240613))
    return _replays_randperm


def _replays(generator: torch.Generator) -> bool:
    start = generator.get_state()
    for n in (2, 3, 7, _MAX_N):
        expected = [torch.randperm(n, generator=generator).tolist() for _ in range(3)]
        after = generator.get_state()
        generator.set_state(start)
        draws = _draws(3, n, generator).tolist()
        replayed = [_shuffled(n, draws[k * (n - 1) : (k + 1) * (n - 1)]) for k in range(3)]
        if replayed != expected or not torch.equal(generator.get_state(), after):
            return False
        start = after
    return True
