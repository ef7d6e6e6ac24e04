import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from torchjd.autojac import backward

from ._utils import CHUNK_SIZES, count_autograd_calls


def test_hand_example() -> None:
    p = torch.tensor([3.0, -1.0], requires_grad=True)
    backward([2 * p[0] - p[1], p[0] * p[1]])
    assert_close(p.jac, torch.tensor([[2.0, -1.0], [-1.0, 3.0]]))
    assert p.grad is None


def test_signature() -> None:
    parameters = inspect.signature(backward).parameters
    assert list(parameters) == [
        "tensors",
        "jac_tensors",
        "inputs",
        "retain_graph",
        "parallel_chunk_size",
        "present",  # beyond the spec: steps with missing tasks
    ]
    assert parameters["tensors"].kind is inspect.Parameter.POSITIONAL_ONLY
    for name in ["jac_tensors", "inputs", "retain_graph", "parallel_chunk_size"]:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    defaults = {name: p.default for name, p in parameters.items() if name != "tensors"}
    assert defaults == {
        "jac_tensors": None,
        "inputs": None,
        "retain_graph": False,
        "parallel_chunk_size": None,
        "present": None,
    }


def test_tensors_is_positional_only_and_rest_keyword_only() -> None:
    p = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError):
        backward(tensors=p * 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        backward(p * 2, None)  # type: ignore[misc]
    assert not hasattr(p, "jac")


def test_accumulates_over_two_calls() -> None:
    p = torch.tensor([3.0, -1.0], requires_grad=True)
    y = torch.stack([2 * p[0] - p[1], p[0] * p[1]])
    backward(y, retain_graph=True)
    first = p.jac
    backward(y)
    expected = 2 * torch.tensor([[2.0, -1.0], [-1.0, 3.0]])
    assert_close(p.jac, expected)
    assert p.jac is first  # added in place: aliases of the old .jac see the sum


def test_existing_jac_with_other_row_count_is_rejected() -> None:
    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    p.jac = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"already has a `\.jac`"):
        backward(p * 2)  # 3 rows
    with pytest.raises(RuntimeError):  # the reference's error type also holds
        backward(torch.stack([p.sum(), p.sum(), p.sum(), p.sum(), p.sum(), p.sum()]))
    assert_close(p.jac, torch.zeros(2, 3))


def test_existing_one_row_jac_does_not_broadcast() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    p.jac = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        backward(p * 2)


def test_existing_jac_with_wrong_trailing_shape_is_rejected() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    p.jac = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        backward(p * 2)


def test_jac_carries_no_history_and_keeps_dtype() -> None:
    p = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    backward([p.sum() ** 2, (p**3).sum()])
    assert p.jac.dtype == torch.float64
    assert not p.jac.requires_grad and p.jac.grad_fn is None
    assert_close(p.jac, torch.tensor([[6.0, 6.0], [3.0, 12.0]], dtype=torch.float64))


def test_zero_grad_keeps_jac_and_next_backward_accumulates() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    backward(model(x).squeeze(1))
    optimizer.zero_grad()
    assert_close(model.weight.jac, x.unsqueeze(1))
    backward(model(x).squeeze(1))
    assert_close(model.weight.jac, 2 * x.unsqueeze(1))
    assert_close(model.bias.jac, torch.full((2, 1), 2.0))


def test_several_tensors_equal_their_concatenation() -> None:
    p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    y1 = torch.stack([p[0] * p[1], p.sum()])
    y2 = (p**2).reshape(3, 1)
    backward([y1, y2], retain_graph=True)
    separate = p.jac
    del p.jac
    backward(torch.cat([y1.reshape(-1), y2.reshape(-1)]))
    assert_close(p.jac, separate)


def test_mixed_shapes() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    q = torch.tensor(3.0, requires_grad=True)
    backward([p * 2, (p * q).sum()])
    assert_close(p.jac, torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 3.0]]))
    assert q.jac.shape == (3,)
    assert_close(q.jac, torch.tensor([0.0, 0.0, 3.0]))


def test_empty_and_duplicate_tensors() -> None:
    p = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="at least one"):
        backward([])
    y = p * 2
    with pytest.raises(ValueError, match="twice"):
        backward([y, y])


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_non_positive_chunk_size_checked_first(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="parallel_chunk_size"):
        backward([], parallel_chunk_size=chunk_size)  # would otherwise be "empty tensors"


@pytest.mark.parametrize("chunk_size", [1.5, "2", True])
def test_non_int_chunk_size_is_a_type_error(chunk_size: object) -> None:
    p = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError, match="parallel_chunk_size"):
        backward(p * 2, parallel_chunk_size=chunk_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(1, 3), (2, 3), (5, 8), (20, 55)])
@pytest.mark.parametrize("chunk_size", [1, 2, None])
@pytest.mark.parametrize("explicit_inputs", [False, True])
def test_linear_map(shape: tuple[int, int], chunk_size: int | None, explicit_inputs: bool) -> None:
    generator = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    J = torch.randn(shape, generator=generator)
    x = torch.randn(shape[1], generator=generator, requires_grad=True)
    inputs = [x] if explicit_inputs else None
    backward(J @ x, inputs=inputs, parallel_chunk_size=chunk_size)
    assert_close(x.jac, J)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 7),
    n=st.integers(1, 6),
    chunk_size=st.one_of(st.none(), st.integers(1, 9)),
    seed=st.integers(0, 2**16),
)
def test_linear_map_property(m: int, n: int, chunk_size: int | None, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=generator, dtype=torch.float64)
    x = torch.randn(n, generator=generator, dtype=torch.float64, requires_grad=True)
    backward(J @ x, parallel_chunk_size=chunk_size)
    assert_close(x.jac, J)


def test_chunking_frees_the_graph_only_at_the_end() -> None:
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x.exp()  # saves its output: the graph is really freed
    backward(y, parallel_chunk_size=2)  # 2 chunks: the first must retain the graph
    assert_close(x.jac, torch.diag(x.detach().exp()))
    with pytest.raises(RuntimeError):
        backward(y)


def test_retain_graph_allows_a_second_call() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = x.exp()
    backward(y, retain_graph=True, parallel_chunk_size=1)
    backward(y, parallel_chunk_size=1)
    assert_close(x.jac, 2 * torch.diag(x.detach().exp()))


def test_chunks_and_graph_retention_of_each_autograd_call() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    with count_autograd_calls() as calls:
        backward(x.exp(), parallel_chunk_size=2)
    # rows 0-1, 2-3 batched; row 4 alone without vmap; only the last call frees the graph
    assert [c["is_grads_batched"] for c in calls] == [True, True, False]
    assert [c["retain_graph"] for c in calls] == [True, True, False]
    assert_close(x.jac, torch.diag(x.detach().exp()))


def test_chunk_size_one_never_uses_vmap_and_chunk_larger_than_m_is_one_call() -> None:
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with count_autograd_calls() as calls:
        backward(x * 2, parallel_chunk_size=1)
    assert len(calls) == 3 and not any(c["is_grads_batched"] for c in calls)
    del x.jac
    with count_autograd_calls() as calls:
        backward(x * 2, parallel_chunk_size=10)
    assert len(calls) == 1 and calls[0]["is_grads_batched"]
    del x.jac
    with count_autograd_calls() as calls:
        backward((x * 2).sum(), inputs=[x], retain_graph=True)  # m == 1: no vmap
    assert len(calls) == 1 and not calls[0]["is_grads_batched"]


def test_leaf_tensor() -> None:
    leaf = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ValueError, match="grad_fn"):
        backward(leaf)
    backward(leaf, inputs=[leaf])
    assert_close(leaf.jac, torch.eye(2))


def test_detached_tensor() -> None:
    p = torch.ones(2, requires_grad=True)
    detached = (p * 2).detach()
    with pytest.raises(ValueError, match="grad_fn"):
        backward(detached)
    with pytest.raises(RuntimeError):
        backward(detached, inputs=[p])
    assert not hasattr(p, "jac")


def test_input_not_requiring_grad() -> None:
    p = torch.ones(2, requires_grad=True)
    q = torch.ones(2)
    with pytest.raises(RuntimeError, match="require grad"):
        backward(p * q, inputs=[p, q])
    assert not hasattr(p, "jac") and not hasattr(q, "jac")


def test_explicit_inputs() -> None:
    a1 = torch.tensor([1.0, 2.0], requires_grad=True)
    a2 = torch.tensor(3.0, requires_grad=True)
    y = torch.stack([a1[0] * a2, a1[1] + a2])

    backward(y, inputs=[], retain_graph=True)
    assert not hasattr(a1, "jac") and not hasattr(a2, "jac")

    backward(y, inputs=[a1], retain_graph=True)
    assert_close(a1.jac, torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    assert not hasattr(a2, "jac")
    del a1.jac

    backward(y, inputs=[a1, a1, a2], retain_graph=True)
    repeated = (a1.jac.clone(), a2.jac.clone())
    del a1.jac, a2.jac
    backward(y, inputs=[a1, a2])
    assert_close((a1.jac, a2.jac), repeated)
    assert_close(a2.jac, torch.tensor([1.0, 1.0]))


def test_inputs_from_a_generator() -> None:
    model = torch.nn.Linear(2, 2)
    x = torch.tensor([[1.0, -1.0]])
    backward(model(x).reshape(-1), inputs=model.parameters())
    assert model.weight.jac.shape == (2, 2, 2)
    assert_close(model.bias.jac, torch.eye(2))


def test_unused_input_gets_zeros() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    r = torch.ones(3, 2, requires_grad=True)
    backward([p.sum(), (p**2).sum(), p[0]], inputs=[p, r])
    assert_close(r.jac, torch.zeros(3, 3, 2))


def test_non_leaf_input() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    h = p * 3
    with pytest.raises(ValueError, match="retain_grad"):
        backward((h**2).sum(), inputs=[h], retain_graph=True)
    h.retain_grad()
    backward([(h**2).sum(), h[0]], inputs=[h], parallel_chunk_size=1)
    assert_close(h.jac, torch.tensor([[6.0, 12.0], [1.0, 0.0]]))


def test_non_leaf_input_with_retained_grad_is_not_inferred() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    h = p * 3
    h.retain_grad()
    backward(h.sum(), parallel_chunk_size=1)
    assert not hasattr(h, "jac")
    assert_close(p.jac, torch.full((1, 2), 3.0))


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_jac_tensors(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    J_model = torch.randn(4, 3, generator=generator)
    J_init = torch.randn(rows, 4, generator=generator)
    x = torch.randn(3, generator=generator, requires_grad=True)
    backward(J_model @ x, jac_tensors=J_init, inputs=[x])
    assert_close(x.jac, J_init @ J_model)


def test_jac_tensors_with_two_tensors() -> None:
    generator = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(3, 2, generator=generator), torch.randn(2, 2, generator=generator)
    J1, J2 = torch.randn(4, 3, generator=generator), torch.randn(4, 2, generator=generator)
    x = torch.randn(2, generator=generator, requires_grad=True)
    backward([A1 @ x, A2 @ x], jac_tensors=[J1, J2], parallel_chunk_size=3)
    assert_close(x.jac, J1 @ A1 + J2 @ A2)


def test_jac_tensors_for_scalar_tensor_is_one_dimensional() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    backward((x**2).sum(), jac_tensors=torch.tensor([1.0, -2.0, 0.5]))
    assert_close(x.jac, torch.tensor([[2.0, 4.0], [-4.0, -8.0], [1.0, 2.0]]))


def test_jac_tensors_errors() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y1, y2 = x * 2, x.sum()
    with pytest.raises(ValueError, match="one Jacobian per tensor"):
        backward([y1, y2], jac_tensors=[torch.ones(3, 2)])
    with pytest.raises(ValueError, match="shape"):
        backward([y1, y2], jac_tensors=[torch.ones(3, 3), torch.ones(3)])
    with pytest.raises(ValueError, match="same number of rows"):
        backward([y1, y2], jac_tensors=[torch.ones(3, 2), torch.ones(4)])
    with pytest.raises(ValueError, match="shape"):
        backward(y1, jac_tensors=torch.ones(2))  # row dimension missing
    with pytest.raises(ValueError, match="shape"):
        backward(y2, jac_tensors=torch.tensor(1.0))  # 0-dim for a scalar
    with pytest.raises(ValueError, match="0 rows"):
        backward(y1, jac_tensors=torch.ones(0, 2))
    assert not hasattr(x, "jac")


def test_tensors_without_entries() -> None:
    x = torch.ones(0, requires_grad=True)
    with pytest.raises(ValueError, match="no entries"):
        backward(x * 2)


def test_generator_tensors_is_a_type_error() -> None:
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError, match="sequence"):
        backward(y for y in [x * 2])  # type: ignore[arg-type]


def test_very_deep_graph() -> None:
    one = torch.tensor(1.0, requires_grad=True)
    s = torch.tensor(0.0)
    for _ in range(10_000):
        s = s + one
    backward(s)
    assert_close(one.jac, torch.tensor([10_000.0]))


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_scalar_reused_many_times(chunk_size: int | None) -> None:
    a = torch.tensor(1.5, requires_grad=True)
    b = 2 * a
    c = a * b
    d = a * c  # 2a³
    e = a * d  # 2a⁴
    backward([d, e], parallel_chunk_size=chunk_size)
    assert_close(a.jac, torch.stack([6 * a.detach() ** 2, 8 * a.detach() ** 3]))


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_float64_and_dtype_of_each_input(chunk_size: int | None) -> None:
    p64 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    p32 = torch.tensor([3.0], requires_grad=True)
    y = torch.stack([(p64 * p32).sum(), p64[0] + 0 * p32[0]])
    backward(y, parallel_chunk_size=chunk_size)
    assert p64.jac.dtype == torch.float64 and p32.jac.dtype == torch.float32
    assert_close(p64.jac, torch.tensor([[3.0, 3.0], [1.0, 0.0]], dtype=torch.float64))
    assert_close(p32.jac, torch.tensor([[3.0], [0.0]]))


def test_bare_tensor_as_inputs_is_rejected() -> None:
    p = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="wrap it in a list"):
        backward(p * 2, inputs=p)  # type: ignore[arg-type]
    assert not hasattr(p, "jac")
