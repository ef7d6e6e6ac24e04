import pytest
import torch

from torchjd import _permutations
from torchjd._permutations import permuted, randperm_lists, randperm_rows


def _reference(count: int, n: int, seed: int) -> tuple[list[list[int]], torch.Tensor]:
    torch.manual_seed(seed)
    values = [torch.randperm(n).tolist() for _ in range(count)]
    return values, torch.get_rng_state()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 22, 23, 40])
@pytest.mark.parametrize("count", [0, 1, 5])
def test_the_draws_of_successive_randperm_calls(n: int, count: int) -> None:
    # The values of torch.randperm itself, and the generator left as it leaves it (n = 23 and 40
    # are beyond the replay and call torch.randperm).
    for seed in range(3):
        expected, state = _reference(count, n, seed)
        torch.manual_seed(seed)
        assert randperm_lists(count, n) == expected
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(seed)
        rows = randperm_rows(count, n)
        assert rows.shape == (count, n) and rows.dtype == torch.long
        assert rows.tolist() == expected
        assert torch.equal(torch.get_rng_state(), state)


def test_permuted_reads_each_sequence_through_its_permutation() -> None:
    sequences = [[10 * i + k for k in range(6)] for i in range(4)]
    expected, state = _reference(4, 6, 0)
    torch.manual_seed(0)
    assert permuted(sequences) == [[seq[k] for k in perm] for seq, perm in zip(sequences, expected)]
    assert torch.equal(torch.get_rng_state(), state)


def test_without_the_replay_randperm_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_permutations, "_replays_randperm", False)
    calls = []
    original = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n: calls.append(n) or original(n))
    expected, state = _reference(3, 5, 1)  # through the counting wrapper: 3 calls
    torch.manual_seed(1)
    assert randperm_lists(3, 5) == expected
    assert randperm_rows(0, 5).shape == (0, 5)
    assert torch.equal(torch.get_rng_state(), state)
    assert calls == [5] * 6


def test_the_check_rejects_a_wrong_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _permutations._replays(torch.Generator().manual_seed(0))

    def reversed_swaps(n: int, draws: list[int]) -> list[int]:
        permutation = list(range(n))
        for s, r in enumerate(draws):
            t = s + r % (n - s)
            permutation[n - 1 - s], permutation[n - 1 - t] = (
                permutation[n - 1 - t],
                permutation[n - 1 - s],
            )
        return permutation

    monkeypatch.setattr(_permutations, "_shuffled", reversed_swaps)
    assert not _permutations._replays(torch.Generator().manual_seed(0))
