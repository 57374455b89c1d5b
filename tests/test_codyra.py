"""CoDyRA: gates become sparse under the ramped soft threshold, pruned ranks vanish from the merged update."""

import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from models import GateLoRAConv2d, GateLoRALinear, cifar_resnet, lora_layers, vit_cifar
from strategies import CoDyRA, CoDyRAPlugin


def test_gate_layer_is_B_diag_w_A():
    layer = GateLoRALinear(nn.Linear(8, 6), r=3, gate_init="randn")
    with torch.no_grad():
        layer.lora_B.normal_()
    w = layer.lora_gate.detach()
    torch.testing.assert_close(layer.delta_weight(), layer.lora_B @ torch.diag(w) @ layer.lora_A)
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight().T)
    assert GateLoRALinear(nn.Linear(8, 6), r=3, gate_init="ones").lora_gate.eq(1).all()
    with pytest.raises(ValueError, match="Unknown gate_init"):
        GateLoRALinear(nn.Linear(8, 6), r=3, gate_init="zeros")
    conv = GateLoRAConv2d(nn.Conv2d(4, 5, 3, padding=1), r=2, conv_mode="loralib")
    assert conv.lora_gate.shape == (6,)  # one gate per row of A: r·k


class _Spy(CoDyRAPlugin):
    def after_training_exp(self, strategy, **kwargs):
        self.pre = {n: (m.lora_gate.detach().clone(), m.delta_weight().detach().clone(),
                        m.base_layer.weight.detach().clone()) for n, m in self._layers(strategy.model)}
        super().after_training_exp(strategy, **kwargs)


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_gates_become_sparse_and_pruned_ranks_vanish_from_merge(tiny_bm, backbone):
    if backbone == "resnet":
        model, targets = cifar_resnet(20, 10), r"layer\d\.\d+\.conv[12]"
    else:
        model, targets = vit_cifar(10, depth=2, embed_dim=48, num_heads=3), ["attn.qkv", "mlp.fc1"]
    plugin = _Spy(target_modules=targets, r=6, max_kappa=1.5, dense_fraction=0.2, lambda_num=4)
    strategy = SupervisedTemplate(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.9999), weight_decay=0),
        train_mb_size=8, train_epochs=2, plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]),
    )
    strategy.train(tiny_bm.train_stream[0])
    ranks = plugin.rank_history[0]
    assert set(ranks) == set(plugin.adapted_modules)
    assert sum(ranks.values()) < 6 * len(ranks), "the ramped threshold should zero some gates"
    for name, layer in lora_layers(model):
        gate, delta, w_before = plugin.pre[name]
        kept = int(torch.count_nonzero(gate))
        assert kept == ranks[name]
        merged = layer.base_layer.weight.detach() - w_before
        torch.testing.assert_close(merged, delta, atol=1e-6, rtol=0)
        assert torch.linalg.matrix_rank(merged.reshape(merged.shape[0], -1), atol=1e-6) <= kept
        assert layer.kept_rank() == layer.lora_gate.numel()  # restarted at full rank
        assert torch.count_nonzero(layer.lora_B) == 0


def test_strategy_runs_two_experiences_and_state_dict_holds_gates(tiny_bm):
    model = cifar_resnet(20, 10)
    strategy = CoDyRA(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                      target_modules=r"layer3\.\d+\.conv[12]", r=4, train_mb_size=16,
                      evaluator=EvaluationPlugin(loggers=[]))
    for exp in tiny_bm.train_stream:
        strategy.train(exp)
    assert len(strategy.method_plugin.rank_history) == 2
    sd = model.state_dict()
    assert "layer3.0.conv1.lora_gate" in sd and "layer3.0.conv1.base_layer.weight" in sd
