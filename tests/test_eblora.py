"""EBLoRA: orthonormal factors after every step, V and the merged update orthogonal to F, F orthonormal, errors."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from models import StiefelLoRAConv2d, StiefelLoRALinear, cifar_resnet, vit_cifar
from strategies import EBLoRA, grow_subspace


def _eye_err(X):
    return (X.T @ X - torch.eye(X.shape[1], dtype=X.dtype)).abs().max().item()


class _Checker(SupervisedPlugin):
    """Runs after EBLoRA's own after_update (plugins run in list order): records the worst deviations."""

    def __init__(self):
        super().__init__()
        self.orth, self.perp, self.steps, self.moved = 0.0, 0.0, 0, 0.0
        self.prev = None

    def after_update(self, strategy, **kwargs):
        layers = [m for m in strategy.model.modules() if isinstance(m, (StiefelLoRALinear, StiefelLoRAConv2d))]
        for m in layers:
            self.orth = max(self.orth, _eye_err(m.U()), _eye_err(m.V()))
            if m.subspace.numel():
                self.perp = max(self.perp, (m.subspace.T @ m.V()).abs().max().item())
        cur = torch.cat([m.lora_A.detach().flatten() for m in layers])
        if self.prev is not None and len(cur) == len(self.prev):
            self.moved = max(self.moved, (cur - self.prev).abs().max().item())
        self.prev = cur.clone()
        self.steps += 1


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_stiefel_constraints_hold_every_step_and_merge_is_orthogonal_to_F(tiny_bm, backbone):
    if backbone == "resnet":
        model, targets = cifar_resnet(20, 10), r"layer3\.\d+\.conv[12]"
    else:
        model, targets = vit_cifar(10, depth=2, embed_dim=48, num_heads=3), ["attn.qkv", "mlp.fc2"]
    checker = _Checker()
    strategy = EBLoRA(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                      target_modules=targets, r=2, energy_threshold=0.9, grad_fraction=0.5, train_mb_size=8,
                      plugins=[checker], evaluator=EvaluationPlugin(loggers=[]))
    layers = [m for m in model.modules() if isinstance(m, (StiefelLoRALinear, StiefelLoRAConv2d))]
    strategy.train(tiny_bm.train_stream[0])
    F_sizes = [m.subspace.shape[1] for m in layers]
    assert all(k > 0 for k in F_sizes), "F must grow after the first experience"
    for m in layers:
        assert _eye_err(m.subspace) < 1e-5
    w_before = [m.base_layer.weight.detach().clone() for m in layers]
    F_before = [m.subspace.clone() for m in layers]
    strategy.train(tiny_bm.train_stream[1])
    assert checker.steps >= 10 and checker.moved > 1e-4, "the factors must actually move"
    assert checker.orth < 1e-5, f"U/V orthonormality broken by {checker.orth}"
    assert checker.perp < 1e-5, f"V not orthogonal to F by {checker.perp}"
    for m, w0, F in zip(layers, w_before, F_before):
        delta = (m.base_layer.weight.detach() - w0).reshape(w0.shape[0], -1)
        assert delta.abs().max() > 0, "the second experience's update was not merged"
        # the merged update of experience 2 leaves experience 1's gradient directions alone
        assert (delta @ F).abs().max() < 1e-5 * max(1.0, delta.abs().max().item())
        assert m.subspace.shape[1] >= F.shape[1] and _eye_err(m.subspace) < 1e-5
        torch.testing.assert_close(m.subspace[:, : F.shape[1]].abs(), F.abs(), atol=1e-4, rtol=0)


def test_flat_spectrum():
    layer = StiefelLoRALinear(nn.Linear(12, 10), r=3, alpha=6)
    with torch.no_grad():
        layer.lora_scale.fill_(0.7)
    s = torch.linalg.svdvals(layer.delta_weight())
    torch.testing.assert_close(s[:3], torch.full((3,), 2 * 0.7), atol=1e-5, rtol=0)
    assert s[3:].abs().max() < 1e-5


def test_grow_subspace_energy():
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(20, 20))[0]
    G = U[:, :3] @ torch.diag(torch.tensor([10.0, 1.0, 0.1])) @ torch.randn(3, 7)
    F = grow_subspace(torch.zeros(20, 0), G, 0.9)
    assert F.shape[1] >= 1 and ((F @ F.T @ G) ** 2).sum() / (G ** 2).sum() >= 0.9
    F2 = grow_subspace(F, G, 0.9999)
    assert F2.shape[1] > F.shape[1] and ((F2 @ F2.T @ G) ** 2).sum() / (G ** 2).sum() >= 0.9999
    assert _eye_err(F2) < 1e-5


def test_rank_larger_than_free_dimension_degrades_to_the_free_dimension():
    layer = StiefelLoRALinear(nn.Linear(6, 8), r=2)
    F = torch.linalg.qr(torch.randn(6, 5))[0]
    layer.subspace = F
    layer.reset_lora_parameters()
    assert layer.active_r == 1
    U, V = layer.U(), layer.V()
    assert torch.count_nonzero(U[:, 1]) == 0 and torch.count_nonzero(V[:, 1]) == 0
    assert float(V[:, 0].norm()) == pytest.approx(1, abs=1e-5) and float((F.T @ V[:, 0]).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="kxk_1x1"):
        StiefelLoRAConv2d(nn.Conv2d(4, 4, 3), r=2, conv_mode="loralib")


def test_narrow_1x1_conv_runs_out_of_free_directions_without_stopping(tiny_bm):
    """A 1x1 conv with 3 input channels cannot keep rank 2 once F holds 2 directions (pytorchcv's resnet20_cifar10
    downsample convs stopped a run at experience 4): the layer continues at the rank it has room for."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Conv2d(3, 8, 1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.conv(torch.relu(self.mix(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = Net()
    s = EBLoRA(model=model, target_modules=["mix", "conv"], r=2, energy_threshold=0.9999, train_mb_size=8,
               evaluator=EvaluationPlugin(loggers=[]))
    with pytest.warns(UserWarning, match="free input directions"):
        for exp in tiny_bm.train_stream:
            s.train(exp)
        s.train(tiny_bm.train_stream[0])  # a third task on the narrow layer
    plugin = s.method_plugin
    assert any("mix" in d for d in plugin.degraded.values()), plugin.subspace_history
    layer = plugin._layers(model)[0]
    k = layer.active_r
    assert k < 2 and torch.count_nonzero(layer.V()[:, k:]) == 0


def test_subspace_saved_and_restored():
    layer = StiefelLoRALinear(nn.Linear(6, 8), r=2)
    layer.subspace = torch.linalg.qr(torch.randn(6, 3))[0]
    fresh = StiefelLoRALinear(nn.Linear(6, 8), r=2)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.subspace, layer.subspace)


def test_polar_matches_the_svd_form_batched_and_rank_deficient():
    from models import polar

    torch.manual_seed(0)
    M = torch.randn(5, 40, 4)
    u, _, vh = torch.linalg.svd(M, full_matrices=False)
    torch.testing.assert_close(polar(M), u @ vh, atol=1e-5, rtol=0)
    torch.testing.assert_close(polar(M[0]), (u @ vh)[0], atol=1e-5, rtol=0)
    low = torch.randn(40, 2) @ torch.randn(2, 4)  # rank 2: the Gram form is singular, the SVD form is used
    P = polar(low)
    assert P.shape == (40, 4) and torch.isfinite(P).all()
    torch.testing.assert_close(P.T @ P, torch.eye(4), atol=1e-5, rtol=0)
