"""SD-LoRA: earlier directions unit-norm and frozen, every magnitude learnable, the layer computes the formula."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from conftest import small_model
from torch import nn

from models import LoRAMagnitudes, SDLoRALinear, SumLoRAMixin
from strategies import SDLoRA


class _Grads(SupervisedPlugin):
    """Whether the past magnitudes receive gradients (after the backward pass)."""

    def __init__(self):
        super().__init__()
        self.past_grad = 0.0

    def after_backward(self, strategy, **kwargs):
        for p in strategy.model.sd_lora_magnitudes.past.values():
            if p.grad is not None:
                self.past_grad = max(self.past_grad, p.grad.abs().item())


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_old_directions_stay_unit_norm_and_frozen_magnitudes_learn(tiny_bm, backbone):
    model, targets = small_model(backbone)
    grads = _Grads()
    strategy = SDLoRA(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                      target_modules=targets, r=2, train_mb_size=8, plugins=[grads],
                      evaluator=EvaluationPlugin(loggers=[]))
    strategy.train(tiny_bm.train_stream[0])
    layers = [m for m in model.modules() if isinstance(m, SumLoRAMixin)]
    trained0 = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in layers]
    strategy.train(tiny_bm.train_stream[1])
    mags = model.sd_lora_magnitudes
    assert list(mags.past) == ["0"]
    assert grads.past_grad > 0, "the frozen direction's magnitude must learn"
    assert mags.past["0"].item() != pytest.approx(0.8, abs=1e-7)
    for m, (a0, b0) in zip(layers, trained0):
        A, B = m.bank_A["0"], m.bank_B["0"]
        assert not A.requires_grad and not B.requires_grad
        torch.testing.assert_close(A.norm(), torch.tensor(1.0))
        torch.testing.assert_close(B.norm(), torch.tensor(1.0))
        torch.testing.assert_close(A, a0 / a0.norm())  # the direction trained on task 0, never moved since
        torch.testing.assert_close(B, b0 / b0.norm())
        assert m.lora_B.abs().max() > 0, "the new direction must train"
    # the layer computes ΔW = α_0 B̂_0 Â_0 + α · s · B A (weights as the delta; for a Linear also the output)
    for m in layers:
        want = mags.past["0"] * m._lora_delta(m.bank_A["0"], m.bank_B["0"]) \
            + mags.current * m.scaling * m._lora_delta(m.lora_A, m.lora_B)
        torch.testing.assert_close(m.delta_weight(), want)
        if isinstance(m.base_layer, nn.Linear):
            xin = torch.randn(3, m.base_layer.in_features)
            torch.testing.assert_close(m(xin), m.base_layer(xin) + xin @ want.T)


def test_direction_freezes_only_when_the_next_task_starts(tiny_bm):
    """Evaluation after a task sees the model as trained: the switch to the normalised direction happens later."""
    model, targets = small_model("vit")
    strategy = SDLoRA(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), target_modules=targets,
                      r=2, train_mb_size=8, evaluator=EvaluationPlugin(loggers=[]))
    strategy.train(tiny_bm.train_stream[0])
    layers = [m for m in model.modules() if isinstance(m, SumLoRAMixin)]
    assert all(m.current_task == 0 and not len(m.bank_A) for m in layers)
    assert strategy.method_plugin.pending_task == 0
    strategy.train(tiny_bm.train_stream[1])
    assert all(m.current_task == 1 and list(m.bank_A) == ["0"] for m in layers)


def test_layer_without_magnitudes_says_how_to_attach_them():
    layer = SDLoRALinear(nn.Linear(6, 4), r=2)
    layer.current_task = 0
    with pytest.raises(RuntimeError, match="SDLoRAPlugin.prepare"):
        layer(torch.randn(2, 6))
    object.__setattr__(layer, "magnitudes", LoRAMagnitudes(0.5))
    assert layer(torch.randn(2, 6)).shape == (2, 4)
