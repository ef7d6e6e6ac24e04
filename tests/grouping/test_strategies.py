"""The four partitions of Gradient Vaccine: together, per network, per layer, per tensor."""

import pytest
import torch
from torch import Tensor, nn

from tests.grouping._helpers import make_model
from torchjd import grouping
from torchjd.grouping import per_layer, per_network, per_tensor, together


def _ids(groups: list[list[nn.Parameter]]) -> list[list[int]]:
    return [[id(p) for p in group] for group in groups]


def _flat(groups: list[list[nn.Parameter]]) -> list[int]:
    return [id(p) for group in groups for p in group]


class _Residual(nn.Module):
    """A container owning a parameter of its own (a learned gate) besides its children."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(3))
        self.inner = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gate * self.inner(self.norm(x))


def _twelve_block_mlp() -> tuple[nn.Module, nn.Module, nn.Module]:
    """The 12-block MLP of the benchmarks (76 parameter tensors)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)

    encoder = nn.Sequential(nn.Linear(16, 8), *(Block() for _ in range(6)))
    decoder = nn.Sequential(*(Block() for _ in range(6)), nn.LayerNorm(8))
    return nn.Sequential(encoder, decoder), encoder, decoder


def test_the_paper_names_are_aliases() -> None:
    assert grouping.whole_model is together
    assert grouping.enc_dec is per_network
    assert grouping.all_layer is per_layer
    assert grouping.all_matrix is per_tensor


def test_group_counts_on_the_twelve_block_mlp() -> None:
    model, encoder, decoder = _twelve_block_mlp()
    params = list(model.parameters())
    assert len(params) == 76
    assert [len(g) for g in together(model)] == [76]
    assert [len(g) for g in per_network(encoder, decoder)] == [2 + 6 * 6, 6 * 6 + 2]
    assert len(per_layer(model)) == 1 + 12 * 3 + 1
    assert all(len(g) == 2 for g in per_layer(model))
    assert _ids(per_tensor(model)) == [[id(p)] for p in params]
    for groups in (together(model), per_network(encoder, decoder), per_layer(model)):
        assert _flat(groups) == [id(p) for p in params]  # every parameter once, in model order


def test_per_layer_matches_the_leaf_module_filter_of_the_paper() -> None:
    model = make_model(2)
    leaves = [
        m
        for m in [*model.encoder.modules(), *model.decoder.modules()]
        if list(m.parameters()) and not list(m.children())
    ]
    expected = [list(m.parameters()) for m in leaves]
    assert _ids(per_layer(model.encoder, model.decoder)) == _ids(expected)


def test_together_and_per_tensor_follow_the_order_of_parameters() -> None:
    model = make_model(2)
    shared = model.shared
    assert _ids(together(model.encoder, model.decoder)) == [[id(p) for p in shared]]
    assert _ids(per_tensor(model.encoder, model.decoder)) == [[id(p)] for p in shared]
    assert _ids(per_network(model.encoder, model.decoder)) == [
        [id(p) for p in model.encoder.parameters()],
        [id(p) for p in model.decoder.parameters()],
    ]


def test_parameters_of_a_container_get_their_own_group_before_its_children() -> None:
    model = nn.Sequential(nn.Linear(3, 3), _Residual())
    residual = model[1]
    groups = per_layer(model)
    assert _ids(groups) == _ids(
        [
            list(model[0].parameters()),
            [residual.gate],
            list(residual.inner.parameters()),
            list(residual.norm.parameters()),
        ]
    )
    assert sorted(_flat(groups)) == sorted(id(p) for p in model.parameters())


def test_per_layer_keeps_the_own_parameters_of_multihead_attention() -> None:
    attention = nn.MultiheadAttention(4, 2)
    groups = per_layer(attention)
    assert _ids(groups) == _ids(
        [
            [attention.in_proj_weight, attention.in_proj_bias],
            [attention.out_proj.weight, attention.out_proj.bias],
        ]
    )


@pytest.mark.parametrize("strategy", [together, per_layer, per_tensor])
def test_frozen_parameters_are_left_out(strategy: object) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    trainable = [model[0].weight, model[0].bias, model[2].weight]
    groups = strategy(model)  # type: ignore[operator]
    assert _flat(groups) == [id(p) for p in trainable]
    assert all(group for group in groups)


def test_shared_parameters_appear_once_at_their_first_place() -> None:
    shared = nn.Linear(3, 3)
    first, second = nn.Sequential(shared, nn.Linear(3, 2)), nn.Sequential(shared, nn.Linear(2, 2))
    ids = [id(p) for p in [*shared.parameters(), *first[1].parameters(), *second[1].parameters()]]
    assert _flat(together(first, second)) == ids
    assert _flat(per_tensor(first, second)) == ids
    assert _flat(per_layer(first, second)) == ids
    assert len(per_layer(first, second)) == 3
    assert _ids(per_network(first, second)) == [ids[:4], ids[4:]]


def test_the_order_is_deterministic() -> None:
    model = make_model(2)
    for strategy in (together, per_layer, per_tensor):
        assert _ids(strategy(model.encoder, model.decoder)) == _ids(
            strategy(model.encoder, model.decoder)
        )


def test_per_network_refuses_a_network_without_parameters_of_its_own() -> None:
    encoder = nn.Linear(3, 3)
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match=r"Network 1 of `networks` \(Linear\)"):
        per_network(encoder, frozen)
    with pytest.raises(ValueError, match="Network 1"):
        per_network(encoder, nn.Sequential(encoder))  # all its parameters are the encoder's


@pytest.mark.parametrize("strategy", [together, per_network, per_layer, per_tensor])
def test_errors(strategy: object) -> None:
    with pytest.raises(ValueError, match="at least one module"):
        strategy()  # type: ignore[operator]
    with pytest.raises(TypeError, match="not their parameters"):
        strategy(nn.Linear(2, 2).parameters())  # type: ignore[operator]
    with pytest.raises(TypeError, match="element 1 is of type int"):
        strategy(nn.Linear(2, 2), 3)  # type: ignore[operator]
    with pytest.raises(ValueError, match="trainable"):
        strategy(nn.ReLU())  # type: ignore[operator]
