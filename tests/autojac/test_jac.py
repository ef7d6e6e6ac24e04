import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from torchjd.autojac import backward, jac

from ._utils import CHUNK_SIZES


def test_hand_example() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    h = x**2
    result = jac([h[0] + h[1], h[0] - h[1]], [x, h])
    assert isinstance(result, tuple) and len(result) == 2
    assert_close(result[0], torch.tensor([[2.0, 4.0], [2.0, -4.0]]))
    assert_close(result[1], torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    assert not hasattr(x, "jac") and not hasattr(h, "jac") and x.grad is None


def test_signature() -> None:
    parameters = inspect.signature(jac).parameters
    assert list(parameters) == [
        "outputs",
        "inputs",
        "jac_outputs",
        "retain_graph",
        "parallel_chunk_size",
    ]
    for name in ["outputs", "inputs"]:
        assert parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert parameters[name].default is inspect.Parameter.empty
    for name, default in [("jac_outputs", None), ("retain_graph", False)]:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[name].default is default
    assert parameters["parallel_chunk_size"].default is None


def test_keywords_accepted() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    (result,) = jac(outputs=x * 3, inputs=x)
    assert_close(result, 3 * torch.eye(2))
    y = x * 3
    with pytest.raises(TypeError):
        jac(y, x, None)  # type: ignore[misc]


def test_shapes_and_no_side_effects() -> None:
    a = torch.ones(2, 3, requires_grad=True)
    b = torch.tensor(2.0, requires_grad=True)
    a.jac = torch.full((5, 2, 3), 7.0)  # must be neither read nor written
    y = [(a * b).sum(dim=1), a.sum() * b]  # 2 + 1 = 3 rows
    ja, jb = jac(y, [a, b])
    assert ja.shape == (3, 2, 3) and jb.shape == (3,)
    assert_close(ja[0], torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]))
    assert_close(ja[2], torch.full((2, 3), 2.0))
    assert_close(jb, torch.tensor([3.0, 3.0, 6.0]))
    assert_close(a.jac, torch.full((5, 2, 3), 7.0))
    assert not hasattr(b, "jac") and a.grad is None and b.grad is None


def test_repeated_inputs() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    first, second = jac(x**2, [x, x])
    assert first is second
    assert_close(first, torch.diag(2 * x.detach()))


def test_empty_inputs_computes_nothing() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y1, y2 = x.exp().sum(), (x**2).sum()
    assert jac([y1, y2], inputs=[]) == ()
    (result,) = jac([y1, y2], x)  # the graph was not freed
    assert_close(result, torch.stack([x.detach().exp(), 2 * x.detach()]))


def test_scalar_output_and_input() -> None:
    x = torch.tensor(3.0, requires_grad=True)
    (result,) = jac(x**2, x)
    assert result.shape == (1,)
    assert_close(result, torch.tensor([6.0]))


def test_one_shot_iterator_inputs() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    z = torch.tensor(4.0, requires_grad=True)
    result = jac((x * z).sum(), iter([x, z]))
    assert len(result) == 2
    assert_close(result[0], torch.tensor([[4.0, 4.0]]))
    assert_close(result[1], torch.tensor([3.0]))


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chain_rule(chunk_size: int | None) -> None:
    x = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    h = torch.stack([x[0] * x[1], x[1] + x[2], x[2] ** 2])
    y1, y2 = h.sum() ** 2, (h * torch.tensor([1.0, 2.0, 3.0])).sum()
    (jac_h,) = jac([y1, y2], h, retain_graph=True, parallel_chunk_size=chunk_size)
    (direct,) = jac([y1, y2], x, retain_graph=True, parallel_chunk_size=chunk_size)
    (chained,) = jac(h, x, jac_outputs=jac_h, retain_graph=True, parallel_chunk_size=chunk_size)
    assert_close(chained, direct)
    backward(h, jac_tensors=jac_h, parallel_chunk_size=chunk_size)
    assert_close(x.jac, direct)


def test_non_leaf_inputs_are_allowed() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    h = x * 3  # no retain_grad needed: nothing is written to h
    (result,) = jac(h.prod(), h)
    assert_close(result, torch.tensor([[6.0, 3.0]]))


def test_errors() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    with pytest.raises(ValueError, match="at least one"):
        jac([], x)
    with pytest.raises(ValueError, match="twice"):
        jac([y, y], x)
    with pytest.raises(ValueError, match="parallel_chunk_size"):
        jac(y, x, parallel_chunk_size=0)
    with pytest.raises(ValueError, match="one Jacobian per"):
        jac([y, y.sum()], x, jac_outputs=[torch.ones(1, 2)])
    with pytest.raises(ValueError, match="shape"):
        jac(y, x, jac_outputs=torch.ones(1, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        jac([y, y.sum()], x, jac_outputs=[torch.ones(1, 2), torch.ones(2)])
    with pytest.raises(RuntimeError, match="require grad"):
        jac(y, torch.ones(2))
    with pytest.raises(RuntimeError, match="require grad"):
        jac(y.detach(), x)
    with pytest.raises(TypeError, match="parallel_chunk_size"):
        jac(y, x, parallel_chunk_size=2.0)  # type: ignore[arg-type]


def test_graph_freed_without_retain_graph() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = x.exp()
    jac(y, x, parallel_chunk_size=1)
    with pytest.raises(RuntimeError):
        jac(y, x)


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 5),
    n=st.integers(1, 5),
    k=st.integers(1, 4),
    chunk_size=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 2**16),
)
def test_initial_jacobian_property(
    m: int, n: int, k: int, chunk_size: int | None, seed: int
) -> None:
    """``jac(A @ x, x, jac_outputs=J0) == J0 @ A`` for any A, J0 and chunk size."""
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(k, n, generator=generator, dtype=torch.float64)
    J0 = torch.randn(m, k, generator=generator, dtype=torch.float64)
    x = torch.randn(n, generator=generator, dtype=torch.float64, requires_grad=True)
    (result,) = jac(A @ x, x, jac_outputs=J0, parallel_chunk_size=chunk_size)
    assert_close(result, J0 @ A)
