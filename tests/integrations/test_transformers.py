"""JacobianDescentTrainer with the real transformers package, on a model built locally."""

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from torch import Tensor, nn
from torch.nn.functional import mse_loss
from torch.utils.data import Dataset
from transformers import TrainingArguments

from torchjd.aggregation import PCD, GradDrop, UPGrad
from torchjd.autojac import mtl_backward
from torchjd.grouping import GroupedAggregator, per_layer
from torchjd.integrations import task_views
from torchjd.integrations.transformers import JacobianDescentTrainer

from ._two_tasks import data, hand_written_step, networks


class _TwoTaskModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.heads = networks()

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        views = task_views(self.trunk(x), 2)
        losses = [mse_loss(h(v), y[:, [i]]) for i, (h, v) in enumerate(zip(self.heads, views))]
        return {"losses": torch.stack(losses)}


class _Dicts(Dataset):
    def __init__(self, n: int) -> None:
        self.x, self.y = data(n).tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def _arguments(path: Path, **kwargs: object) -> TrainingArguments:
    options: dict[str, object] = {
        "output_dir": str(path),
        "max_steps": 3,
        "per_device_train_batch_size": 8,  # the whole data set: the order of the samples is moot
        "learning_rate": 0.1,
        "lr_scheduler_type": "constant",
        "optim": "sgd",
        "weight_decay": 0.0,
        "max_grad_norm": 0.0,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
    }
    options.update(kwargs)
    return TrainingArguments(**options)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="accelerate")


def test_steps_match_the_hand_written_step(tmp_path: Path) -> None:
    model = _TwoTaskModel()
    trainer = JacobianDescentTrainer(
        model=model,
        args=_arguments(tmp_path),
        train_dataset=_Dicts(8),
        aggregator=UPGrad(),
        shared_modules=[model.trunk],
        task_names=["a", "b"],
    )
    trainer.train()

    trunk, heads = networks()
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, y = data(8).tensors
    weights = []
    for _ in range(3):
        grads, w = hand_written_step(trunk, heads, x, y)
        weights.append(w)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    expected = torch.cat([p.detach().flatten() for p in params])
    actual = torch.cat(
        [p.detach().flatten() for p in [*model.trunk.parameters(), *model.heads.parameters()]]
    )
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)
    logged = [entry for entry in trainer.state.log_history if "weight/a" in entry]
    assert len(logged) == 3
    assert logged[-1]["weight/a"] == pytest.approx(float(weights[-1][0]), rel=1e-5)
    assert "cosine/a-b" in logged[-1]


def test_grouped_steps_match_mtl_backward_and_jac_to_grad(tmp_path: Path) -> None:
    model = _TwoTaskModel()
    trainer = JacobianDescentTrainer(
        model=model,
        args=_arguments(tmp_path),
        train_dataset=_Dicts(8),
        aggregator=GroupedAggregator(per_layer(model.trunk), UPGrad),
        shared_modules=[model.trunk],
        task_names=["a", "b"],
    )
    trainer.train()

    trunk, heads = networks()
    grouped = GroupedAggregator(per_layer(trunk), UPGrad)
    params = [*trunk.parameters(), *heads.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, y = data(8).tensors
    for _ in range(3):
        features = trunk(x)
        losses = [mse_loss(h(features), y[:, [i]]) for i, h in enumerate(heads)]
        mtl_backward(losses, features=features)
        weights = grouped.jac_to_grad()
        optimizer.step()
        optimizer.zero_grad()

    expected = torch.cat([p.detach().flatten() for p in params])
    actual = torch.cat(
        [p.detach().flatten() for p in [*model.trunk.parameters(), *model.heads.parameters()]]
    )
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)
    logged = [entry for entry in trainer.state.log_history if "weight/0/a" in entry][-1]
    for k, layer_weights in enumerate(weights):
        assert logged[f"weight/{k}/b"] == pytest.approx(float(layer_weights[1]), rel=1e-5)


def test_bf16_accumulation_and_aggregator_state_in_checkpoints(tmp_path: Path) -> None:
    model = _TwoTaskModel()
    arguments = _arguments(
        tmp_path,
        bf16=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        save_strategy="steps",
        save_steps=2,
        max_steps=2,
    )
    trainer = JacobianDescentTrainer(
        model=model,
        args=arguments,
        train_dataset=_Dicts(16),
        aggregator=PCD(),
        shared_modules=[model.trunk],
    )
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = trainer.aggregator.state_dict()
    saved = torch.load(tmp_path / "checkpoint-2" / "aggregator.pt", weights_only=False)
    tensors = [k for k, v in state.items() if torch.is_tensor(v)]
    assert tensors and any(state[k].abs().sum() > 0 for k in tensors)
    for key in tensors:
        assert torch.equal(saved[key], state[key])

    resumed = JacobianDescentTrainer(
        model=_TwoTaskModel(),
        args=arguments,
        train_dataset=_Dicts(16),
        aggregator=PCD(),
        shared_modules=[model.trunk],
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))  # no step left to take
    for key in tensors:
        assert torch.equal(resumed.aggregator.state_dict()[key], state[key])


def test_refuses_an_aggregator_that_needs_the_matrix(tmp_path: Path) -> None:
    model = _TwoTaskModel()
    with pytest.raises(ValueError, match="mtl_backward"):
        JacobianDescentTrainer(
            model=model,
            args=_arguments(tmp_path),
            aggregator=GradDrop(),
            shared_modules=[model.trunk],
        )


def test_refuses_a_model_without_task_losses(tmp_path: Path) -> None:
    class _Plain(_TwoTaskModel):
        def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
            return {"loss": super().forward(x, y)["losses"].sum()}

    model = _Plain()
    trainer = JacobianDescentTrainer(
        model=model,
        args=_arguments(tmp_path),
        train_dataset=_Dicts(8),
        aggregator=UPGrad(),
        shared_modules=[model.trunk],
    )
    with pytest.raises(ValueError, match="'losses'"):
        trainer.train()
