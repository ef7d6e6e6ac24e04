import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from torchjd.autojac import mtl_backward

from ._utils import CHUNK_SIZES


def test_hand_example() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    w1 = torch.tensor([1.0, 0.0], requires_grad=True)
    w2 = torch.tensor([0.0, 1.0], requires_grad=True)
    f = p0 * 3
    mtl_backward([w1 @ f, w2 @ f], features=f)
    assert_close(p0.jac, torch.tensor([[3.0, 0.0], [0.0, 3.0]]))
    assert_close(w1.grad, torch.tensor([3.0, 6.0]))
    assert_close(w2.grad, torch.tensor([3.0, 6.0]))
    assert p0.grad is None
    assert not hasattr(w1, "jac") and not hasattr(w2, "jac")


def test_signature() -> None:
    parameters = inspect.signature(mtl_backward).parameters
    assert list(parameters) == [
        "tensors",
        "features",
        "grad_tensors",
        "tasks_params",
        "shared_params",
        "retain_graph",
        "parallel_chunk_size",
        "present",  # beyond the spec: steps with missing tasks
    ]
    assert parameters["tensors"].kind is inspect.Parameter.POSITIONAL_ONLY
    assert parameters["features"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert parameters["features"].default is inspect.Parameter.empty
    keyword_only = {
        "grad_tensors": None,
        "tasks_params": None,
        "shared_params": None,
        "retain_graph": False,
        "parallel_chunk_size": None,
        "present": None,
    }
    for name, default in keyword_only.items():
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[name].default is default


def _three_tasks(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(4, 3, generator=generator)
    p0 = torch.randn(3, generator=generator, requires_grad=True)
    heads = [torch.randn(4, generator=generator, requires_grad=True) for _ in range(3)]
    return J, p0, heads, J @ p0


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("explicit", [False, True])
def test_linear_trunk(chunk_size: int | None, explicit: bool) -> None:
    J, p0, heads, f = _three_tasks(0)
    kwargs = {"tasks_params": [[h] for h in heads], "shared_params": [p0]} if explicit else {}
    mtl_backward([h @ f for h in heads], features=f, parallel_chunk_size=chunk_size, **kwargs)
    for h in heads:
        assert_close(h.grad, f.detach())
    assert_close(p0.jac, torch.stack([h.detach() for h in heads]) @ J)


def test_grad_tensors() -> None:
    generator = torch.Generator().manual_seed(1)
    J = torch.randn(2, 3, generator=generator)
    p0 = torch.randn(3, generator=generator, requires_grad=True)
    p1 = torch.randn(2, generator=generator, requires_grad=True)
    p2 = torch.randn(2, 2, generator=generator, requires_grad=True)
    p3 = torch.randn(4, 2, generator=generator, requires_grad=True)
    f = J @ p0
    y1, y2, y3 = p1 @ f, p2 @ f, p3 @ f  # shapes [], [2], [4]
    g1 = torch.tensor(2.0)
    g2 = torch.tensor([1.0, -1.0])
    g3 = torch.tensor([0.5, 1.0, 0.0, 2.0])
    mtl_backward([y1, y2, y3], features=f, grad_tensors=[g1, g2, g3])
    expected_rows = torch.stack([g1 * p1, g2 @ p2, g3 @ p3]).detach()
    assert_close(p0.jac, expected_rows @ J)
    assert_close(p1.grad, g1 * f.detach())
    assert_close(p2.grad, torch.outer(g2, f.detach()))
    assert_close(p3.grad, torch.outer(g3, f.detach()))


def test_grad_tensors_errors() -> None:
    p0 = torch.ones(2, requires_grad=True)
    w = torch.ones(3, 2, requires_grad=True)
    f = p0 * 2
    y_vec, y_scalar = w @ f, (w @ f).sum()
    with pytest.raises(ValueError, match="grad_tensors"):
        mtl_backward([y_vec, y_scalar], features=f)
    with pytest.raises(ValueError, match="one tensor per task"):
        mtl_backward([y_vec, y_scalar], features=f, grad_tensors=[torch.ones(3)])
    with pytest.raises(ValueError, match="exactly the shape"):
        mtl_backward([y_vec, y_scalar], features=f, grad_tensors=[torch.ones(3), torch.ones(1)])
    assert not hasattr(p0, "jac") and w.grad is None


def test_param_shared_by_two_tasks() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    p1 = torch.tensor([3.0, 4.0], requires_grad=True)
    p2 = torch.tensor([5.0, -1.0], requires_grad=True)
    p12 = torch.tensor([2.0, 0.5], requires_grad=True)
    f = p0 * 1.0
    mtl_backward([(f * p1 * p12).sum(), (f * p2 * p12).sum()], features=f)
    f_ = f.detach()
    assert_close(p12.grad, f_ * p1.detach() + f_ * p2.detach())
    assert_close(p1.grad, f_ * p12.detach())
    assert_close(p0.jac, torch.stack([p1 * p12, p2 * p12]).detach())


def test_task_computed_from_another_task_needs_retain_graph() -> None:
    def setup() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        p0 = torch.tensor([1.0, 2.0], requires_grad=True)
        p1 = torch.tensor([3.0, 4.0], requires_grad=True)
        p2 = torch.tensor(2.0, requires_grad=True)
        f = p0 * 1.0
        y1 = (f * p1).exp().sum()  # exp saves its output: freeing it is detectable
        return p0, [y1, y1 * p2], f

    _, tensors, f = setup()
    with pytest.raises(RuntimeError):
        mtl_backward(tensors, features=f)
    p0, tensors, f = setup()
    mtl_backward(tensors, features=f, retain_graph=True)
    assert p0.jac.shape == (2, 2)


def test_overlapping_shared_and_task_params() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    p1 = torch.tensor([3.0, 4.0], requires_grad=True)
    f = p0 * 2
    with pytest.raises(ValueError, match="both a shared parameter"):
        mtl_backward([p1 @ f], features=f, tasks_params=[[p1, p0]], shared_params=[p0])
    with pytest.raises(ValueError, match="inferred"):
        mtl_backward([p1 @ f + p0.sum()], features=f)  # the task uses p0 directly
    assert not hasattr(p0, "jac") and p1.grad is None and p0.grad is None


def test_structure_errors() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    p1 = torch.tensor([3.0, 4.0], requires_grad=True)
    f = p0 * 2
    y = p1 @ f
    with pytest.raises(ValueError, match="one iterable of parameters per task"):
        mtl_backward([y], features=f, tasks_params=[[p1], []])
    with pytest.raises(ValueError, match="at least one"):
        mtl_backward([], features=f)
    with pytest.raises(ValueError, match="at least one"):
        mtl_backward([y], features=[])
    with pytest.raises(ValueError, match="twice"):
        mtl_backward([y, y], features=f)
    with pytest.raises(ValueError, match="twice"):
        mtl_backward([y], features=[f, f])
    with pytest.raises(ValueError, match="parallel_chunk_size"):
        mtl_backward([], features=[], parallel_chunk_size=0)
    with pytest.raises(TypeError, match="parallel_chunk_size"):
        mtl_backward([y], features=f, parallel_chunk_size=1.0)  # type: ignore[arg-type]
    assert not hasattr(p0, "jac") and p1.grad is None


def test_features_without_grad_fn() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    p1 = torch.tensor([3.0, 4.0], requires_grad=True)
    detached = (p0 * 2).detach()
    with pytest.raises(ValueError, match="grad_fn"):
        mtl_backward([p1 @ detached], features=detached)
    with pytest.raises(ValueError, match="grad_fn"):
        mtl_backward([p1 @ p0], features=p0)  # a leaf feature, with inferred params
    with pytest.raises(ValueError, match="grad_fn"):
        mtl_backward([p1], features=p0 * 2, shared_params=[p0])  # a leaf task tensor
    assert p1.grad is None


def test_empty_params_write_nothing() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    p1 = torch.tensor([3.0, 4.0], requires_grad=True)
    p2 = torch.tensor([1.0, 1.0], requires_grad=True)
    f = p0 * 2
    mtl_backward([p1 @ f, p2 @ f], features=f, tasks_params=[[], []], shared_params=[])
    for p in (p0, p1, p2):
        assert p.grad is None and not hasattr(p, "jac")


def test_unused_explicit_task_param_gets_zero_grad() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    p1 = torch.tensor([3.0, 4.0], requires_grad=True)
    unused = torch.ones(2, 2, requires_grad=True)
    f = p0 * 2
    mtl_backward([p1 @ f], features=f, tasks_params=[[p1, unused]])
    assert_close(unused.grad, torch.zeros(2, 2))


def test_task_not_using_a_feature_gives_zero_rows() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    q0 = torch.tensor([-1.0], requires_grad=True)
    w1 = torch.tensor([3.0, 4.0], requires_grad=True)
    w2 = torch.tensor(5.0, requires_grad=True)
    w3 = torch.tensor(7.0, requires_grad=True)
    f1, f2 = p0 * 2, q0 * 3
    mtl_backward([w1 @ f1, (w2 * f2).sum(), w3 * 2], features=[f1, f2])
    assert_close(p0.jac, torch.tensor([[6.0, 8.0], [0.0, 0.0], [0.0, 0.0]]))
    assert_close(q0.jac, torch.tensor([[0.0], [15.0], [0.0]]))
    assert_close(w3.grad, torch.tensor(2.0))


def test_existing_head_grad_is_added_to() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    w.grad = torch.tensor([10.0, 20.0])
    existing = w.grad
    f = p0 * 2
    mtl_backward([w @ f], features=f)
    assert_close(w.grad, torch.tensor([12.0, 24.0]))
    assert w.grad is existing


def test_repeated_params_count_once() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    f = p0 * 2
    mtl_backward([w @ f], features=f, tasks_params=[[w, w]], shared_params=[p0, p0])
    assert_close(w.grad, torch.tensor([2.0, 4.0]))
    assert_close(p0.jac, torch.tensor([[6.0, 8.0]]))


def test_single_task_has_one_row() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    f = p0 * 2
    mtl_backward(w @ f, features=f)  # a single tensor is one task
    assert p0.jac.shape == (1, 2)


def test_loss_vector_is_one_non_scalar_task() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.ones(3, 2, requires_grad=True)
    f = p0 * 2
    with pytest.raises(ValueError, match="grad_tensors"):
        mtl_backward(w @ f, features=f)


def test_twice_on_retained_graph_doubles() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    w1 = torch.tensor([1.0, 0.0], requires_grad=True)
    w2 = torch.tensor([0.0, 1.0], requires_grad=True)
    f = p0 * 3
    tensors = [w1 @ f, w2 @ f]
    mtl_backward(tensors, features=f, retain_graph=True)
    mtl_backward(tensors, features=f)
    assert_close(p0.jac, torch.tensor([[6.0, 0.0], [0.0, 6.0]]))
    assert_close(w1.grad, torch.tensor([6.0, 12.0]))


def test_multiple_features_and_real_modules() -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Linear(3, 4)
    head_a, head_b = torch.nn.Linear(4, 1), torch.nn.Linear(2, 1)
    x = torch.randn(5, 3)
    h = torch.relu(trunk(x))
    f1, f2 = h[:, :2], h[:, 2:]
    y_a = head_a(torch.cat([f1, f2], dim=1)).pow(2).mean()
    y_b = head_b(f2).pow(2).mean()
    mtl_backward([y_a, y_b], features=[f1, f2], retain_graph=True)
    params = list(trunk.parameters())
    for row, y in enumerate([y_a, y_b]):
        for p, g in zip(params, torch.autograd.grad(y, params, retain_graph=True)):
            assert_close(p.jac[row], g)
    (head_b_weight_grad,) = torch.autograd.grad(y_b, [head_b.weight])
    assert_close(head_b.weight.grad, head_b_weight_grad)


def test_non_leaf_shared_param_is_rejected() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    h = p0 * 1.0
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    f = h * 2
    with pytest.raises(ValueError, match="retain_grad"):
        mtl_backward([w @ f], features=f, shared_params=[h])
    assert w.grad is None


def test_param_not_requiring_grad() -> None:
    p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    f = p0 * 2
    with pytest.raises(RuntimeError):
        mtl_backward([w @ f], features=f, tasks_params=[[w, torch.ones(2)]])
    with pytest.raises(RuntimeError):
        mtl_backward([w @ f], features=f, shared_params=[p0, torch.ones(2)])


@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(1, 6),
    n_features=st.integers(1, 4),
    n_shared=st.integers(1, 4),
    chunk_size=st.one_of(st.none(), st.integers(1, 7)),
    seed=st.integers(0, 2**16),
)
def test_linear_trunk_property(
    k: int, n_features: int, n_shared: int, chunk_size: int | None, seed: int
) -> None:
    """With ``f = J @ p0`` and ``y_i = h_i @ f``: ``p0.jac == H @ J`` and ``h_i.grad == f``."""
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(n_features, n_shared, generator=generator, dtype=torch.float64)
    H = torch.randn(k, n_features, generator=generator, dtype=torch.float64)
    p0 = torch.randn(n_shared, generator=generator, dtype=torch.float64, requires_grad=True)
    heads = [h.clone().requires_grad_() for h in H]
    f = J @ p0
    mtl_backward([h @ f for h in heads], features=f, parallel_chunk_size=chunk_size)
    assert_close(p0.jac, H @ J)
    for h in heads:
        assert_close(h.grad, f.detach())
