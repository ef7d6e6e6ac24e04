import pytest

import torchjd
from torchjd import Stateful


def test_exported_at_top_level() -> None:
    assert torchjd.__all__ == ["Stateful"]


def test_is_abstract() -> None:
    with pytest.raises(TypeError):
        Stateful()  # type: ignore[abstract]


def test_subclass_without_reset_cannot_be_instantiated() -> None:
    class Forgetful(Stateful):
        pass

    with pytest.raises(TypeError):
        Forgetful()  # type: ignore[abstract]


def test_subclass_with_reset() -> None:
    class Counter(Stateful):
        def __init__(self) -> None:
            self.count = 0

        def reset(self) -> None:
            self.count = 0

    counter = Counter()
    counter.count = 3
    counter.reset()
    assert isinstance(counter, Stateful) and counter.count == 0


def test_deprecated_aliases() -> None:
    from torchjd import autojac

    for name in ("backward", "mtl_backward"):
        with pytest.warns(DeprecationWarning, match="torchjd.autojac"):
            alias = getattr(torchjd, name)
        assert alias is getattr(autojac, name)


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError):
        _ = torchjd.jac
    with pytest.raises(ImportError):
        from torchjd import something_missing  # noqa: F401
