"""The integrations package imports no framework; each integration names its extra when missing."""

import importlib
import subprocess
import sys

import pytest
import torch

import torchjd._optional
from torchjd.integrations import task_views


def test_the_package_imports_no_framework() -> None:
    code = (
        "import sys, torchjd.integrations; "
        "assert not {'lightning', 'transformers', 'accelerate'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize(
    ("module", "extra"), [("lightning", "lightning"), ("transformers", "transformers")]
)
def test_a_missing_framework_names_its_extra(
    module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torchjd._optional, "find_spec", lambda name: None)
    monkeypatch.delitem(sys.modules, f"torchjd.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf'pip install "torchjd\[{extra}\]"'):
        importlib.import_module(f"torchjd.integrations.{module}")


def test_task_views_are_aliases_outside_a_training_step() -> None:
    features = torch.randn(3, 4, requires_grad=True)
    views = task_views(features, 2)
    assert len(views) == 2 and all(torch.equal(v, features) for v in views)
    (views[0].sum() + 2 * views[1].sum()).backward()
    assert torch.equal(features.grad, torch.full((3, 4), 3.0))


@pytest.mark.parametrize("num_tasks", [0, -1, 1.5, True])
def test_task_views_refuse_a_bad_number_of_tasks(num_tasks: object) -> None:
    with pytest.raises(ValueError, match="num_tasks"):
        task_views(torch.zeros(2), num_tasks)  # type: ignore[arg-type]
