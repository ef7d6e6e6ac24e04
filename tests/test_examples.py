"""The usage patterns of the documentation, run as tests (each snippet must run unchanged)."""

import itertools

import torch
from torch import nn
from torch.nn.functional import cosine_similarity, mse_loss

from torchjd.aggregation import GradVac, UPGrad
from torchjd.autojac import backward, jac_to_grad, mtl_backward


def test_basic_usage() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    agg = UPGrad()

    x = torch.randn(12, 6)
    y_a, y_b = torch.randn(12), torch.randn(12)
    out = net(x)
    loss_a = mse_loss(out[:, 0], y_a)
    loss_b = mse_loss(out[:, 1], y_b)

    backward([loss_a, loss_b])
    for p in net.parameters():
        assert p.jac.shape == (2, *p.shape) and p.grad is None

    weights = jac_to_grad(net.parameters(), agg)
    assert weights.shape == (2,)
    for p in net.parameters():
        assert not hasattr(p, "jac") and p.grad.shape == p.shape
    opt.step()
    opt.zero_grad()


def test_basic_usage_through_the_module_import() -> None:
    from torchjd import autojac

    p = torch.tensor([3.0, -1.0], requires_grad=True)
    autojac.backward([2 * p[0] - p[1], p[0] * p[1]])
    torch.testing.assert_close(p.jac, torch.tensor([[2.0, -1.0], [-1.0, 3.0]]))


def test_multi_task_learning() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU())
    head_a, head_b = nn.Linear(4, 1), nn.Linear(4, 1)
    params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    agg = UPGrad()

    for _ in range(3):
        x = torch.randn(10, 8)
        t_a, t_b = torch.randn(10, 1), torch.randn(10, 1)
        feats = trunk(x)
        loss_a = mse_loss(head_a(feats), t_a)
        loss_b = mse_loss(head_b(feats), t_b)

        mtl_backward([loss_a, loss_b], features=feats)
        assert all(p.jac.shape == (2, *p.shape) for p in trunk.parameters())
        assert all(p.grad is not None and not hasattr(p, "jac") for p in head_a.parameters())
        expected = torch.autograd.grad(mse_loss(head_a(feats.detach()), t_a), head_a.weight)[0]
        assert torch.allclose(head_a.weight.grad, expected, atol=1e-6)
        jac_to_grad(trunk.parameters(), agg)
        opt.step()
        opt.zero_grad()


def test_iwrm_with_autojac() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1))
    x, y = torch.randn(9, 5), torch.randn(9)
    losses = nn.MSELoss(reduction="none")(model(x).squeeze(1), y)
    backward(losses)
    assert all(p.jac.shape == (9, *p.shape) for p in model.parameters())
    weights = jac_to_grad(model.parameters(), UPGrad())
    assert weights.shape == (9,)
    # No per-sample loss increases to first order along the update.
    for i in range(9):
        grads = torch.autograd.grad(
            nn.MSELoss()(model(x[i : i + 1]).squeeze(1), y[i : i + 1]), list(model.parameters())
        )
        inner = sum((g * p.grad).sum() for g, p in zip(grads, model.parameters()))
        assert inner >= -1e-3 * sum(p.grad.norm() ** 2 for p in model.parameters()) ** 0.5


def test_rnn() -> None:
    torch.manual_seed(0)
    rnn = nn.RNN(input_size=4, hidden_size=6, num_layers=1)
    opt = torch.optim.SGD(rnn.parameters(), lr=0.05)
    agg = UPGrad()
    seq = torch.randn(5, 2, 4)
    target = torch.randn(5, 2, 6)

    out, _ = rnn(seq)
    losses = ((out - target) ** 2).mean(dim=[1, 2])
    backward(losses, parallel_chunk_size=1)
    assert all(p.jac.shape == (5, *p.shape) for p in rnn.parameters())
    jac_to_grad(rnn.parameters(), agg)
    opt.step()
    opt.zero_grad()


def test_automatic_mixed_precision() -> None:
    from torch.amp import GradScaler

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    head_a, head_b = nn.Linear(4, 1), nn.Linear(4, 1)
    params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    scaler = GradScaler(device="cpu")
    agg = UPGrad()

    x, t_a, t_b = torch.randn(6, 8), torch.randn(6, 1), torch.randn(6, 1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        feats = trunk(x)
        loss_a = mse_loss(head_a(feats), t_a)
        loss_b = mse_loss(head_b(feats), t_b)

    scaled = scaler.scale([loss_a, loss_b])
    mtl_backward(scaled, features=feats)
    jac_to_grad(trunk.parameters(), agg)
    assert all(p.grad.dtype == torch.float32 for p in params)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def test_monitoring() -> None:
    torch.manual_seed(0)
    seen = {}

    def on_weights(_module, _inputs, weights):
        seen["weights"] = weights

    def on_aggregation(_module, inputs, aggregation):
        jacobian = inputs[0]
        seen["shape"] = jacobian.shape
        seen["cos"] = cosine_similarity(aggregation, jacobian.mean(dim=0), dim=0).item()

    trunk = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    head_a, head_b = nn.Linear(4, 1), nn.Linear(4, 1)
    agg = UPGrad()
    agg.gramian_weighting.register_forward_hook(on_weights)
    agg.register_forward_hook(on_aggregation)

    x, t_a, t_b = torch.randn(6, 8), torch.randn(6, 1), torch.randn(6, 1)
    feats = trunk(x)
    mtl_backward([mse_loss(head_a(feats), t_a), mse_loss(head_b(feats), t_b)], features=feats)
    returned = jac_to_grad(trunk.parameters(), agg)
    assert torch.allclose(returned, seen["weights"])
    assert seen["shape"] == (2, sum(p.numel() for p in trunk.parameters()))
    assert -1.0 <= seen["cos"] <= 1.0 + 1e-6


def test_monitoring_without_conflict_gives_the_mean() -> None:
    agg = UPGrad()
    seen = {}
    agg.register_forward_hook(lambda _m, inputs, out: seen.update(j=inputs[0], out=out))
    p = torch.zeros(2, requires_grad=True)
    p.jac = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
    weights = jac_to_grad([p], agg)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]), atol=1e-3, rtol=0)
    cosine = cosine_similarity(seen["out"], seen["j"].mean(dim=0), dim=0)
    torch.testing.assert_close(cosine, torch.tensor(1.0), atol=1e-6, rtol=0)


def _grouping_model() -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    enc = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    dec = nn.Sequential(nn.Linear(5, 3), nn.ReLU())
    return enc, dec, nn.Linear(3, 1), nn.Linear(3, 1)


def test_grouping_strategies() -> None:
    torch.manual_seed(0)
    enc, dec, head_a, head_b = _grouping_model()
    x, t_a, t_b = torch.randn(4, 6), torch.randn(4, 1), torch.randn(4, 1)

    def step():
        feats = dec(enc(x))
        mtl_backward([mse_loss(head_a(feats), t_a), mse_loss(head_b(feats), t_b)], features=feats)

    shared = [*enc.parameters(), *dec.parameters()]
    layers = [
        m
        for m in [*enc.modules(), *dec.modules()]
        if list(m.parameters()) and not list(m.children())
    ]
    strategies = {
        "together": [shared],
        "per_network": [list(enc.parameters()), list(dec.parameters())],
        "per_layer": [list(m.parameters()) for m in layers],
        "per_tensor": [[p] for p in shared],
    }
    for groups in strategies.values():
        aggregators = [GradVac() for _ in groups]
        for _ in range(2):
            step()
            for group, agg in zip(groups, aggregators):
                jac_to_grad(group, agg)
            assert all(p.grad is not None and not hasattr(p, "jac") for p in shared)
            for p in [*shared, *head_a.parameters(), *head_b.parameters()]:
                p.grad = None


def test_grouped_result_equals_aggregating_each_group_alone() -> None:
    """Per group, jac_to_grad gives exactly GradVac applied to that group's own Jacobian."""
    torch.manual_seed(0)
    enc, dec, head_a, head_b = _grouping_model()
    shared = [*enc.parameters(), *dec.parameters()]
    groups = [[p] for p in shared]  # per tensor
    grouped = [GradVac() for _ in groups]
    alone = [GradVac() for _ in groups]
    for _step in range(3):
        x, t_a, t_b = torch.randn(4, 6), torch.randn(4, 1), torch.randn(4, 1)
        feats = dec(enc(x))
        mtl_backward([mse_loss(head_a(feats), t_a), mse_loss(head_b(feats), t_b)], features=feats)
        matrices = [torch.cat([p.jac.reshape(2, -1) for p in g], dim=1) for g in groups]
        for group, agg, matrix, reference in zip(groups, grouped, matrices, alone):
            jac_to_grad(group, agg)
            expected = reference(matrix)
            actual = torch.cat([p.grad.reshape(-1) for p in group])
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
        for p in [*shared, *head_a.parameters(), *head_b.parameters()]:
            p.grad = None
    # Each group's GradVac kept its own EMA state: on the same probe, their outputs differ.
    probe = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    outputs = [agg(probe) for agg in grouped]
    assert any(not torch.allclose(a, b) for a, b in itertools.pairwise(outputs))


def test_grouping_state_independence() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    first, second = GradVac(), GradVac()
    torch.testing.assert_close(first(jacobian), torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(first(jacobian), torch.tensor([0.311, 1.311]), atol=1e-3, rtol=0)
    torch.testing.assert_close(second(jacobian), torch.tensor([0.5, 1.5]))
    first.reset()
    torch.testing.assert_close(first(jacobian), torch.tensor([0.5, 1.5]))
