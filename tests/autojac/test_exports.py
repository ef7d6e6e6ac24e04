import warnings

import pytest
import torch

import torchjd
import torchjd.autojac


def test_all() -> None:
    assert torchjd.autojac.__all__ == ["backward", "jac", "jac_to_grad", "mtl_backward"]
    for name in torchjd.autojac.__all__:
        assert callable(getattr(torchjd.autojac, name))


def test_autojac_is_an_attribute_of_the_package() -> None:
    assert torchjd.autojac is torchjd.autojac  # imported by `import torchjd`
    assert hasattr(torchjd, "aggregation") and hasattr(torchjd, "linalg")


@pytest.mark.parametrize("name", ["backward", "mtl_backward"])
def test_deprecated_top_level_alias(name: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace: dict[str, object] = {}
        exec(f"from torchjd import {name}", namespace)
    deprecations = [w for w in caught if w.category is DeprecationWarning]
    assert deprecations  # `from` imports access the attribute more than once
    assert all("torchjd.autojac" in str(w.message) for w in deprecations)
    assert namespace[name] is getattr(torchjd.autojac, name)


def test_deprecated_backward_alias_works() -> None:
    p = torch.tensor([3.0, -1.0], requires_grad=True)
    with pytest.warns(DeprecationWarning):
        alias = torchjd.backward
    alias([2 * p[0] - p[1], p[0] * p[1]])
    torch.testing.assert_close(p.jac, torch.tensor([[2.0, -1.0], [-1.0, 3.0]]))


def test_other_names_are_not_top_level() -> None:
    with pytest.raises(ImportError):
        exec("from torchjd import jac", {})
    with pytest.raises(ImportError):
        exec("from torchjd import jac_to_grad", {})
    with pytest.raises(ImportError):
        exec("from torchjd import something_missing", {})
    assert torchjd.__all__ == ["Stateful"]
