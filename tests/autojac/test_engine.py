import pytest
import torch
from torch.testing import assert_close

from torchjd._graph import infer_leaves
from torchjd.autojac._engine import GivenRows, IdentityRows, vjp_rows

from ._utils import count_autograd_calls


def test_infer_leaves_breadth_first_order_without_duplicates() -> None:
    a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(2.0, requires_grad=True)
    c = torch.tensor(3.0, requires_grad=True)
    frozen = torch.tensor(4.0)
    y = (a * b) * (c + a) + frozen
    # levels: add -> mul -> (a*b, c+a) -> (a, b, c, a again)
    assert [id(t) for t in infer_leaves([y])] == [id(a), id(b), id(c)]


def test_infer_leaves_excluded_blocks_only_that_path() -> None:
    p = torch.tensor(1.0, requires_grad=True)
    q = torch.tensor(2.0, requires_grad=True)
    f = p * 2
    y = f * q + p  # p is also reachable without going through f
    # levels: add -> (mul, p) -> (f excluded, q)
    assert [id(t) for t in infer_leaves([y], excluded=[f])] == [id(p), id(q)]
    assert [id(t) for t in infer_leaves([f * q], excluded=[f])] == [id(q)]
    assert infer_leaves([f], excluded=[f]) == []


def test_infer_leaves_deep_chain_is_iterative() -> None:
    one = torch.tensor(1.0, requires_grad=True)
    s = torch.tensor(0.0)
    for _ in range(10_000):
        s = s + one
    assert infer_leaves([s]) == [one]


def test_infer_leaves_ignores_non_leaves_with_retained_grad() -> None:
    p = torch.ones(2, requires_grad=True)
    h = p * 2
    h.retain_grad()
    assert infer_leaves([h.sum()]) == [p]


def test_identity_rows_chunks() -> None:
    a, b = torch.ones(2), torch.ones(1, 2)
    rows = IdentityRows([a, b])
    assert rows.m == 4
    full = rows.chunk(0, 4)
    assert_close(torch.cat([full[0], full[1].reshape(4, 2)], dim=1), torch.eye(4))
    first, second = rows.chunk(0, 2)
    assert second is None  # rows 0-1 belong to `a` only
    assert_close(first, torch.eye(2))
    first, second = rows.chunk(1, 3)
    assert_close(first, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert_close(second, torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]]))


def test_given_rows_are_views() -> None:
    jacobian = torch.arange(6.0).reshape(3, 2)
    rows = GivenRows([jacobian])
    assert rows.m == 3
    assert rows.chunk(0, 3)[0] is jacobian
    (chunk,) = rows.chunk(1, 3)
    assert chunk.data_ptr() == jacobian[1:].data_ptr()


def test_zero_blocks_are_skipped_while_the_graph_is_retained() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y1, y2 = x.exp().sum(), (x**2).sum()
    with count_autograd_calls() as calls:
        (jacobian,) = vjp_rows([y1, y2], [x], IdentityRows([y1, y2]), False, 1)
    # first chunk only differentiates y1; the last one differentiates both to free the graph
    assert [c["n_outputs"] for c in calls] == [1, 2]
    assert_close(jacobian, torch.stack([x.detach().exp(), 2 * x.detach()]))


def test_no_inputs_no_call() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = x.exp()
    with count_autograd_calls() as calls:
        assert vjp_rows([y], [], IdentityRows([y]), False, None) == []
    assert calls == []


def test_unused_input_zeros_with_dtype_and_device() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    _, jacobian = vjp_rows([x * 2], [x, unused], IdentityRows([x * 2]), False, 1)
    assert jacobian.dtype == torch.float64
    assert_close(jacobian, torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, None])
def test_partially_unused_input_across_chunks(chunk_size: int | None) -> None:
    """An input used by some chunks only gets zeros for the others."""
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    z = torch.tensor(3.0, requires_grad=True)
    y1, y2 = x * 2, z * x  # rows 0-1 do not use z
    jx, jz = vjp_rows([y1, y2], [x, z], IdentityRows([y1, y2]), False, chunk_size)
    assert_close(jz, torch.tensor([0.0, 0.0, 1.0, 2.0]))
    assert_close(jx, torch.cat([2 * torch.eye(2), 3 * torch.eye(2)]))
