"""InfLoRA: designed A rows inside the space DualGPM leaves free, A frozen, old branches frozen, DualGPM itself."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from conftest import small_model

from models import SumLoRAMixin
from strategies import InfLoRA, dualgpm_update


class _Snap(SupervisedPlugin):
    """After InfLoRA's before_training_exp (plugins run in list order): the designed A of each layer."""

    def __init__(self):
        super().__init__()
        self.designed = []

    def before_training_exp(self, strategy, **kwargs):
        layers = [m for m in strategy.model.modules() if isinstance(m, SumLoRAMixin)]
        self.designed.append([m.lora_A.detach().clone() for m in layers])


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_designed_A_lies_in_the_allowed_subspace_and_only_B_trains(tiny_bm, backbone):
    model, targets = small_model(backbone)
    snap = _Snap()
    strategy = InfLoRA(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                       target_modules=targets, r=2, lamb=0.9, lame=0.95, train_mb_size=8, plugins=[snap],
                       evaluator=EvaluationPlugin(loggers=[]))
    plugin = strategy.method_plugin
    strategy.train(tiny_bm.train_stream[0])
    layers = [m for m in model.modules() if isinstance(m, SumLoRAMixin)]
    bank0 = [(m.bank_A["0"].clone(), m.bank_B["0"].clone()) for m in layers]
    assert all(b.abs().max() > 0 for _, b in bank0), "B of task 0 must have trained"
    strategy.train(tiny_bm.train_stream[1])
    for name, m, A in zip(plugin.adapted_modules, layers, snap.designed[1]):
        F, kind = plugin.subspaces[name], plugin.subspace_kinds[name]
        assert A.abs().max() > 0
        rows = A.reshape(A.shape[0], -1)
        F = F.to(rows)
        if kind == "remove":  # rows orthogonal to the protected inputs of task 0
            leak = (rows @ F).norm() / rows.norm()
        else:  # rows inside the allowed (retained) space
            leak = (rows - rows @ F @ F.T).norm() / rows.norm()
        assert leak < 1e-4, f"{name}: A leaves the allowed subspace by {leak:.2e} ({kind})"
        torch.testing.assert_close(m.bank_A["1"], A)  # designed, then frozen: training never moved it
    for m, (a0, b0) in zip(layers, bank0):
        assert torch.equal(m.bank_A["0"], a0) and torch.equal(m.bank_B["0"], b0), "task 0's branch moved"
        assert not m.lora_A.requires_grad and m.lora_B.requires_grad
    assert len(plugin.subspace_history) == 2
    # every branch is summed at inference: the layer's update is the sum of both tasks' B A
    m = layers[0]
    total = sum(m._lora_delta(m.bank_A[k], m.bank_B[k]) for k in ("0", "1")) * m.scaling
    torch.testing.assert_close(m.delta_weight(), total)


def test_the_new_branch_does_not_change_outputs_on_protected_inputs(tiny_bm):
    """The point of the design: on inputs in the protected span F, the new branch adds nothing."""
    model, targets = small_model("vit")
    strategy = InfLoRA(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), target_modules=targets,
                       r=2, lamb=0.5, lame=0.6, train_mb_size=8, evaluator=EvaluationPlugin(loggers=[]))
    for exp in tiny_bm.train_stream:
        strategy.train(exp)
    plugin = strategy.method_plugin
    checked = 0
    for name, m in zip(plugin.adapted_modules, [m for m in model.modules() if isinstance(m, SumLoRAMixin)]):
        if plugin.subspace_kinds[name] != "remove":
            continue
        # F was grown after task 1; its first columns are the directions protected after task 0
        F0 = plugin.subspaces[name][:, : plugin.subspace_history[0]["protected"][name]]
        d1 = m._lora_delta(m.bank_A["1"], m.bank_B["1"])  # (out, in)
        assert d1.abs().max() > 0
        assert (d1 @ F0).abs().max() < 1e-5 * d1.abs().max().item()
        checked += 1
    assert checked


def test_dualgpm_energy_threshold_and_complement():
    torch.manual_seed(0)
    d = 12
    U = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    H = U @ torch.diag(torch.tensor([10.0, 5.0, 1.0] + [1e-3] * (d - 3), dtype=torch.float64)) @ U.T
    F, kind = dualgpm_update(None, None, H, 0.9)
    assert kind == "remove" and F.shape[1] == 1  # 100 / 126 < 0.9 <= 125 / 126 of the squared energy
    F2, kind2 = dualgpm_update(F, kind, H, 0.99)  # 125 / 126 >= 0.99
    assert kind2 == "remove" and F2.shape[1] == 2
    torch.testing.assert_close(F2.T @ F2, torch.eye(2, dtype=torch.float64))
    # a protected space larger than d/2 is stored by its complement
    H2 = U @ torch.diag(torch.linspace(2, 1, d, dtype=torch.float64)) @ U.T
    F3, kind3 = dualgpm_update(None, None, H2, 0.99)
    assert kind3 == "retain" and F3.shape[1] < d / 2
    assert (F3.T @ U[:, 0]).abs().max() < 1e-8  # the strongest direction is protected, so not allowed


def test_inflora_refuses_grouped_convs():
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(num_classes=4)
    strategy = InfLoRA(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       target_modules=["features.2.conv.1.0"], r=96, evaluator=EvaluationPlugin(loggers=[]))
    with pytest.raises(ValueError, match="ungrouped conv"):
        strategy.method_plugin.prepare(model)
    assert not any(isinstance(m, SumLoRAMixin) for m in model.modules()), "the model must be left untouched"


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=2, dilation=2),
                                  dict(kernel_size=(3, 5), stride=(1, 2), padding=(1, 2)), dict(kernel_size=1)])
def test_subsampled_patches_are_unfolds_columns(conv):
    """The covariance's subsampled conv patches (``cov_samples``) are exactly ``F.unfold``'s at the drawn
    positions, and all of them without subsampling."""
    import torch.nn.functional as F
    from torch import nn

    from strategies.inflora import _patches

    c = nn.Conv2d(3, 4, **conv)
    x = torch.randn(2, 3, 9, 10)
    full = F.unfold(x, c.kernel_size, dilation=c.dilation, padding=c.padding, stride=c.stride).transpose(1, 2)
    keep = torch.randperm(full.shape[1], generator=torch.Generator().manual_seed(3))[:5]
    torch.testing.assert_close(_patches(x, c, 5, torch.Generator().manual_seed(3)), full[:, keep])
    assert torch.equal(_patches(x, c, None, torch.Generator()), full)
    assert torch.equal(_patches(x, c, 10_000, torch.Generator()), full)


def test_covariance_pass_reads_only_the_images_it_needs(tiny_bm):
    """``cov_samples``: a pass reads ceil(cov_samples · d / rows per image) images (the largest over the layers),
    each conv then ceil(cov_samples · d / images) patch positions; 0 reads everything, as the official code."""
    from avalanche.training.plugins import EvaluationPlugin
    from torch import nn

    from models import cifar_resnet

    # layer3.0.conv1 reads layer2's 32 channels: d = 32·9 = 288 at 8·8 = 64 positions per image (stride 2)
    for cs, expected_images in ((0, 40), (1, 5), (2, 9)):
        model = cifar_resnet(20, 10)
        s = InfLoRA(model=model, cov_samples=cs, target_modules=r"layer[13]\.0\.conv1", train_mb_size=8,
                    evaluator=EvaluationPlugin(loggers=[]))
        s.method_plugin.prepare(model)
        s.experience, s.model = tiny_bm.train_stream[0], model
        seen = []
        model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
        covs = s.method_plugin.input_covariances(s)
        assert sum(seen) - 1 * (cs > 0) == expected_images  # (+1: the probe image that reads the shapes)
        assert all(torch.allclose(c, c.T) for c in covs.values())
