"""MergeLoRA in Avalanche: adapters really train in every experience, merge exactly, restart fresh; BN freezing."""

import copy
import re

import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate

from models import cifar_resnet, lora_layers
from strategies import FreezeBatchNormPlugin, MergeLoRA, MergeLoRAPlugin

TARGETS = r"layer\d\.\d+\.conv[12]"


def _quiet():
    return EvaluationPlugin(loggers=[])


class _RecordingMergePlugin(MergeLoRAPlugin):
    """Records the model's output and weights just before the merge."""

    def __init__(self, x, **kw):
        super().__init__(**kw)
        self.x, self.outputs_pre_merge, self.outputs_post_merge = x, [], []

    def after_training_exp(self, strategy, **kwargs):
        strategy.model.eval()
        with torch.no_grad():
            self.outputs_pre_merge.append(strategy.model(self.x.to(strategy.device)))
            super().after_training_exp(strategy, **kwargs)
            self.outputs_post_merge.append(strategy.model(self.x.to(strategy.device)))
        strategy.model.train()


def test_adapters_train_every_experience_merge_exactly_and_restart(tiny_bm):
    model = cifar_resnet(20, 10)
    initial = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    plugin = _RecordingMergePlugin(x, target_modules=TARGETS, r=2)
    strategy = SupervisedTemplate(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=16, train_epochs=2,
        eval_mb_size=64, plugins=[plugin], evaluator=_quiet(),
    )
    snapshots = []
    for exp in tiny_bm.train_stream:
        strategy.train(exp)
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    layers = lora_layers(model)
    assert len(layers) == 18 == len(plugin.adapted_modules)
    for before, after in zip(plugin.outputs_pre_merge, plugin.outputs_post_merge):
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # merging keeps the function
    for _, layer in layers:  # fresh adapter after every merge
        assert not layer.merged and torch.count_nonzero(layer.lora_B) == 0
    base = "layer2.1.conv1.base_layer.weight"
    w0 = initial["layer2.1.conv1.weight"]
    assert (snapshots[0][base] - w0).abs().max() > 1e-6, "experience 0's adapter did not reach the weights"
    assert (snapshots[1][base] - snapshots[0][base]).abs().max() > 1e-6, "experience 1's adapter did not train"
    # untargeted backbone parameters never move
    torch.testing.assert_close(snapshots[1]["conv1.weight"], initial["conv1.weight"])
    torch.testing.assert_close(snapshots[1]["bn1.weight"], initial["bn1.weight"])
    assert plugin.merged_experiences == [0, 1]


def test_adapter_optimizer_state_is_cleared_for_each_experience(tiny_bm):
    model = cifar_resnet(20, 10)
    strategy = MergeLoRA(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), target_modules=TARGETS, r=2,
        train_mb_size=32, evaluator=_quiet(),
    )
    strategy.train(tiny_bm.train_stream[0])
    adapters = [p for _, layer in lora_layers(model) for p in layer.adapter_parameters()]
    assert all(strategy.optimizer.state.get(p) for p in adapters), "Adam should hold the adapters' moments"
    head_state = strategy.optimizer.state[model.linear.weight]
    strategy.method_plugin.before_training_exp(strategy)
    assert not any(strategy.optimizer.state.get(p) for p in adapters)
    assert strategy.optimizer.state[model.linear.weight] is head_state  # the head keeps its state


def test_strategy_without_targets_or_adapters_errors(tiny_bm):
    model = cifar_resnet(20, 10)
    strategy = MergeLoRA(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), target_modules=None,
                         evaluator=_quiet())
    with pytest.raises(ValueError, match="no LoRA layers and no target_modules"):
        strategy.train(tiny_bm.train_stream[0])
    # the default, "auto": every 3x3 conv of the stages (3 stages x 3 blocks x 2), never the stem or the head
    model = cifar_resnet(20, 10)
    MergeLoRA(model=model, evaluator=_quiet()).method_plugin.prepare(model)
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == 18 and all(re.fullmatch(r"layer\d\.\d\.conv[12]", n) for n in names)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_batchnorm_plugin_keeps_statistics(tiny_bm, freeze):
    model = cifar_resnet(20, 10)
    stats = model.layer1[0].bn1.running_mean.clone()
    weight = model.layer1[0].bn1.weight.detach().clone()
    plugins = [FreezeBatchNormPlugin()] if freeze else []
    strategy = MergeLoRA(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), target_modules=TARGETS, r=2,
        trainable_modules=r"linear|.*bn\d", train_mb_size=16, plugins=plugins, evaluator=_quiet(),
    )
    strategy.train(tiny_bm.train_stream[0])
    strategy.eval(tiny_bm.test_stream[:1])  # Avalanche restores modes after evaluation
    strategy.train(tiny_bm.train_stream[1])
    bn = model.layer1[0].bn1
    if freeze:
        torch.testing.assert_close(bn.running_mean, stats)
        torch.testing.assert_close(bn.weight.detach(), weight)
        assert not bn.weight.requires_grad
    else:  # the control: without the plugin the statistics and the trainable BN weights drift
        assert (bn.running_mean - stats).abs().max() > 1e-4
        assert (bn.weight.detach() - weight).abs().max() > 1e-6
