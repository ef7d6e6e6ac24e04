"""Properties shared by every scalarizer of the registry."""

import copy
import io
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from tests.scalarization._registry import SCALARIZERS, Entry, Shape
from torchjd import Stateful
from torchjd.scalarization import Constant, Scalarizer

SHAPES: list[Shape] = [(), (5,), (3, 4), (2, 3, 4)]
DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

entries = pytest.mark.parametrize("entry", SCALARIZERS, ids=lambda e: e.id)


def _entries_where(predicate: Callable[[Entry], bool]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "entry", [e for e in SCALARIZERS if predicate(e)], ids=lambda e: e.id
    )


stateful_entries = _entries_where(lambda e: e.stateful)


def _values(shape: Shape, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Positive values in [0.5, 2.5), valid for every scalarizer."""
    generator = torch.Generator().manual_seed(seed)
    return 0.5 + 2.0 * torch.rand(shape, generator=generator, dtype=dtype)


def _run(entry: Entry, scalarizer: Scalarizer, inputs: list[Tensor]) -> list[Tensor]:
    """Simulate training steps: forward, backward, SGD on the scalarizer's own parameters, then
    the scalarizer's extra per-step call. Return the detached outputs."""
    outputs = []
    for i, values in enumerate(inputs):
        out = scalarizer(values)
        outputs.append(out.detach().clone())
        params = [p for p in scalarizer.parameters() if p.requires_grad]
        if out.requires_grad:
            out.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 0.1 * p.grad
                    p.grad = None
        if entry.advance is not None:
            entry.advance(scalarizer, i, values)
    return outputs


def _call(entry: Entry, scalarizer: Scalarizer, values: Tensor) -> Tensor:
    if entry.randomised:
        torch.manual_seed(0)
    return scalarizer(values)


@entries
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_output_is_finite_0d_and_differentiable(entry: Entry, shape: Shape) -> None:
    values = _values(shape).requires_grad_()
    out = entry.make(shape)(values)
    assert out.shape == ()
    assert torch.isfinite(out)
    assert out.requires_grad
    out.backward()
    assert values.grad is not None
    assert values.grad.shape == values.shape
    assert torch.isfinite(values.grad).all()


@entries
def test_gradient_is_not_identically_zero(entry: Entry) -> None:
    values = _values((4,)).requires_grad_()
    entry.make((4,))(values).backward()
    assert values.grad is not None
    assert values.grad.abs().sum() > 0


@entries
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_device_are_preserved(entry: Entry, dtype: torch.dtype, device: str) -> None:
    scalarizer = entry.make((3,)).to(device)
    values = _values((3,), dtype=dtype).to(device)
    out = _run(entry, scalarizer, [values, values * 0.9, values * 0.8, values * 0.7])
    for o in out:
        assert o.dtype == dtype
        assert o.device == values.device
        assert torch.isfinite(o)


# Random draws its weights in the values' dtype, so its float32 and float64 outputs differ.
@_entries_where(lambda e: not e.randomised)
def test_float64_matches_float32(entry: Entry) -> None:
    values = _values((2, 3), dtype=torch.float64)
    out64 = _call(entry, entry.make((2, 3)), values)
    out32 = _call(entry, entry.make((2, 3)), values.float())
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-6)


@entries
def test_wrong_shape_is_rejected_when_bound(entry: Entry) -> None:
    for shape in [(4,), (3, 1), (), (1, 3)]:
        scalarizer = entry.make((3,))
        if entry.shape_bound:
            with pytest.raises(ValueError, match=r"shape"):
                scalarizer(_values(shape))
        else:
            assert torch.isfinite(scalarizer(_values(shape)))


@entries
def test_empty_values(entry: Entry) -> None:
    if entry.allows_empty:
        out = entry.make((0,))(torch.zeros(0))
        assert out.shape == ()
        assert torch.isfinite(out)
    else:
        with pytest.raises(ValueError):
            entry.make((0,))(torch.zeros(0))


@entries
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_values_are_rejected(entry: Entry, bad: float) -> None:
    scalarizer = entry.make((3,))
    before = copy.deepcopy(scalarizer.state_dict())
    values = torch.tensor([1.0, bad, 2.0])
    with pytest.raises(ValueError, match=r"`values` must be"):
        scalarizer(values)
    # A rejected call leaves the state untouched.
    after = scalarizer.state_dict()
    assert before.keys() == after.keys()
    if isinstance(scalarizer, Stateful):
        fresh = entry.make((3,))
        good = [_values((3,), seed=1)]
        torch.testing.assert_close(_run(entry, scalarizer, good), _run(entry, fresh, good))


@entries
def test_negative_values(entry: Entry) -> None:
    values = torch.tensor([1.0, -1e-13, 2.0])
    if entry.takes_log:
        with pytest.raises(ValueError, match=r"`values` must be"):
            entry.make((3,))(values)
    else:
        assert torch.isfinite(entry.make((3,))(torch.tensor([1.0, -2.0, 0.5])))


@entries
def test_non_tensor_and_integer_values_are_rejected(entry: Entry) -> None:
    scalarizer = entry.make((3,))
    with pytest.raises(TypeError, match=r"`values`"):
        scalarizer([1.0, 2.0, 3.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`values`"):
        scalarizer(torch.tensor([1, 2, 3]))


@_entries_where(lambda e: e.permutation_invariant)
def test_permutation_invariance(entry: Entry) -> None:
    values = _values((2, 3), seed=3)
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    permuted = values.flatten()[permutation].reshape(2, 3)
    scalarizer = entry.make((2, 3))
    torch.testing.assert_close(scalarizer(permuted), scalarizer(values), rtol=1e-6, atol=1e-6)


@entries
def test_same_seed_same_output(entry: Entry) -> None:
    values = _values((4,))
    torch.manual_seed(5)
    first = entry.make((4,))(values)
    torch.manual_seed(5)
    second = entry.make((4,))(values)
    assert torch.equal(first, second)


@entries
def test_stateful_flag(entry: Entry) -> None:
    assert isinstance(entry.make((3,)), Stateful) == entry.stateful


@entries
def test_repr_and_str(entry: Entry) -> None:
    scalarizer = entry.make((3,))
    name = type(scalarizer).__name__
    assert repr(scalarizer).startswith(f"{name}(")
    assert repr(scalarizer).endswith(")")
    if isinstance(scalarizer, Constant):
        assert str(scalarizer).startswith(f"{name}(")
    else:
        assert str(scalarizer) == name


@entries
def test_forward_hooks_run(entry: Entry) -> None:
    scalarizer = entry.make((3,))
    seen: list[Tensor] = []
    scalarizer.register_forward_hook(lambda _module, _args, output: seen.append(output))
    out = scalarizer(_values((3,)))
    assert len(seen) == 1
    assert seen[0] is out


def _inputs(shape: Shape, n: int, seed: int) -> list[Tensor]:
    return [_values(shape, seed=seed + i) for i in range(n)]


@stateful_entries
@pytest.mark.parametrize("n_before", [0, 1, 5], ids=lambda n: f"{n}calls")
def test_state_dict_round_trip_into_fresh_instance(entry: Entry, n_before: int) -> None:
    shape = (2, 3)
    used = entry.make(shape)
    _run(entry, used, _inputs(shape, n_before, seed=10))

    # Through torch.save / torch.load with weights_only=True, as a checkpoint would.
    buffer = io.BytesIO()
    torch.save(used.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = entry.make(shape)
    fresh.load_state_dict(state, strict=True)

    # A second fresh instance loads the live state_dict directly; `used` is then run to the end
    # first, so any aliasing between the two instances would make them diverge.
    fresh_direct = entry.make(shape)
    fresh_direct.load_state_dict(used.state_dict(), strict=True)

    later = _inputs(shape, 6, seed=50)
    expected = _run(entry, used, later)
    for other in (fresh, fresh_direct):
        actual = _run(entry, other, later)
        for a, e in zip(actual, expected):
            assert torch.equal(a, e)
    for a, e in zip(fresh.state_dict().values(), used.state_dict().values()):
        if isinstance(e, Tensor):
            assert torch.equal(a, e)


@stateful_entries
def test_used_state_differs_from_fresh(entry: Entry) -> None:
    """The round trip test is meaningful: after a few steps the output differs from a fresh one."""
    shape = (3,)
    used = entry.make(shape)
    _run(entry, used, _inputs(shape, 5, seed=20))
    probe = _values(shape, seed=99)
    assert not torch.allclose(used(probe), entry.make(shape)(probe))


@stateful_entries
def test_reset_restores_fresh_behaviour(entry: Entry) -> None:
    shape = (4,)
    used = entry.make(shape)
    params_before = list(used.parameters())
    _run(entry, used, _inputs(shape, 5, seed=30))
    used.reset()
    # Parameters are zeroed in place: an optimizer holding them stays valid.
    params_after = list(used.parameters())
    assert len(params_before) == len(params_after)
    assert all(a is b for a, b in zip(params_before, params_after))

    later = _inputs(shape, 5, seed=40)
    expected = _run(entry, entry.make(shape), later)
    actual = _run(entry, used, later)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


@stateful_entries
def test_state_follows_the_device(entry: Entry) -> None:
    if "cuda" not in DEVICES:
        pytest.skip("needs a CUDA device")
    shape = (3,)
    used = entry.make(shape)
    _run(entry, used, _inputs(shape, 5, seed=60))
    moved = copy.deepcopy(used).to("cuda")
    later = _inputs(shape, 4, seed=70)
    expected = _run(entry, used, later)
    actual = _run(entry, moved, [v.cuda() for v in later])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-5, atol=1e-6)


def test_every_public_scalarizer_is_registered() -> None:
    import torchjd.scalarization as package

    public = {
        name
        for name in package.__all__
        if isinstance(getattr(package, name), type) and getattr(package, name) is not Scalarizer
    }
    registered = {type(entry.make((3,))).__name__ for entry in SCALARIZERS}
    assert registered == public
