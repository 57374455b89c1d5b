"""The growing network (a copy of the last stage per task): which modules grow, what trains, what stays fixed,
per-sample routing against a reference written here, and what it stores."""

import numpy as np
import pytest
import torch
import torchvision
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from experiments.benchmarks import split_cifar10
from models import (BASE_ROUTE, TaskBatchNorm, TaskCopy, TaskIncrementalClassifier, cifar_resnet, set_task_routing,
                    vit_cifar)
from strategies import FreezeBatchNormPlugin, Growing, GrowingPlugin, last_stage


def test_last_stage_is_everything_from_the_last_downsampling_block():
    assert last_stage(cifar_resnet(20, 10)) == ["layer3.0", "layer3.1", "layer3.2"]
    mobilenet = torchvision.models.mobilenet_v2(num_classes=10)
    # stride-2 blocks: features 0 (the stem), 2, 4, 7 and 14; features.18 is a Conv-BN-ReLU, opened
    assert last_stage(mobilenet) == ["features.14", "features.15", "features.16", "features.17", "features.18.0",
                                     "features.18.1"]
    with pytest.raises(ValueError, match="no last stage"):  # a ViT downsamples only in its patch embedding
        last_stage(vit_cifar(10, depth=2, embed_dim=48, num_heads=3))
    # downsampling by a parameter-free pooling: the stage starts after it (a VGG's last pool: its MLP classifier)
    vgg = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))
    assert last_stage(vgg) == ["6"]


def test_auto_stage_of_a_task_incremental_model_keeps_a_hidden_classifier_layer():
    # MobileNetV3's classifier is Linear-Hardswish-Dropout-Linear: once the head is an Identity, the hidden Linear
    # is part of the last stage, not a head to leave shared
    model = TaskIncrementalClassifier(torchvision.models.mobilenet_v3_small(num_classes=10), 2)
    plugin = GrowingPlugin()
    plugin.prepare(model)
    assert plugin.grown_modules[0] == "backbone.features.9" and plugin.grown_modules[-1] == "backbone.classifier.0"
    assert isinstance(model.backbone.classifier[0], TaskCopy)


def test_mixed_task_batch_goes_through_each_sample_own_copy():
    block = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
    copy = TaskCopy(block)
    copy.current_task = 0
    with torch.no_grad():
        block[0].weight.add_(1.0)
    copy.store(0)
    copy.reset()
    assert torch.equal(block[0].weight, copy.pretrained[0].weight)  # the next task starts from the pretrained one
    copy.current_task = 1
    with torch.no_grad():
        block[0].weight.mul_(-1.0)
    x = torch.randn(5, 3, 8, 8)
    labels = torch.tensor([1, 0, BASE_ROUTE, 1, 0])
    set_task_routing(copy, labels)
    y = copy(x)
    assert y.shape == (5, 4, 4, 4)  # a strided block changes the shape
    w = {0: copy.bank["0"][0].weight, 1: -copy.pretrained[0].weight, BASE_ROUTE: copy.pretrained[0].weight}
    b = block[0].bias
    for i, t in enumerate(labels.tolist()):  # the reference: each sample through its own task's weights
        ref = torch.relu(torch.nn.functional.conv2d(x[i:i + 1], w[t], b, stride=2, padding=1))
        torch.testing.assert_close(y[i:i + 1], ref)
    with pytest.raises(ValueError, match="never trained"):
        set_task_routing(copy, 3)
        copy(x)


def test_reset_restores_buffers_and_a_saved_model_loads_its_copies():
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    copy = TaskCopy(block)
    block.train()(torch.randn(8, 3, 6, 6))  # running statistics move
    assert not torch.equal(block[1].running_mean, copy.pretrained[1].running_mean)
    copy.store(0)
    copy.reset()
    assert torch.equal(block[1].running_mean, torch.zeros(4)) and torch.equal(block[1].running_var, torch.ones(4))
    fresh = TaskCopy(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    fresh.load_state_dict(copy.state_dict())  # dotted bank keys (bank.0.1.running_mean) create the entry first
    assert fresh.trained_tasks() == [0]
    assert torch.equal(fresh.bank["0"][1].running_mean, copy.bank["0"][1].running_mean)


def test_task_batchnorm_keeps_its_state_dict_names():
    bn = TaskBatchNorm(nn.BatchNorm2d(4))
    bn.store(0)
    assert {"bn.weight", "pretrained.weight", "bank.0.weight", "bn.running_mean"} <= set(bn.state_dict())
    fresh = TaskBatchNorm(nn.BatchNorm2d(4))
    fresh.load_state_dict(bn.state_dict())  # bank entries of the saved model are created
    assert list(fresh.bank) == ["0"]


def _data(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 8)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    x[..., 0] = (y * 60)[:, None, None]
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[::2], y_test=y[::2])
    return split_cifar10(2, seed=0, data=tmp_path / "d.npz", return_task_id=True)


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_only_the_current_copy_and_heads_train_and_earlier_tasks_stay_bit_identical(tmp_path, bn):
    bm = _data(tmp_path)
    model = TaskIncrementalClassifier(cifar_resnet(20, 10), 2)
    if bn == "train":  # statistics away from 0 / 1, so that a trunk BatchNorm in train mode would move them
        with torch.no_grad():
            model.train()(torch.randn(16, 3, 32, 32) * 2 + 1, torch.zeros(16, dtype=torch.long))
    buffers = {n: b.clone() for n, b in model.backbone.named_buffers() if not n.startswith("layer3.")}
    trunk = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not n.startswith("layer3.")}
    pretrained = {n: p.detach().clone() for n, p in model.backbone.layer3.named_parameters()}
    starts = []

    class Spy(SupervisedPlugin):  # the first stage copy's weight as each task starts training
        def before_training_epoch(self, strategy, **kwargs):
            if strategy.clock.train_exp_epochs == 0:
                starts.append(strategy.model.backbone.layer3[0].live.conv1.weight.detach().clone())

    strategy = Growing(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                       train_epochs=2, plugins=[Spy()] + ([FreezeBatchNormPlugin()] if bn == "frozen" else []),
                       evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))
    x0 = torch.stack([s[0] for s in bm.test_stream[0].dataset])
    t0 = torch.zeros(len(x0), dtype=torch.long)

    strategy.train(bm.train_stream[0])
    model.eval()
    with torch.no_grad():
        set_task_routing(model, t0)
        before = model(x0, t0).clone()
    strategy.train(bm.train_stream[1])
    model.eval()
    with torch.no_grad():
        set_task_routing(model, t0)
        after = model(x0, t0)
    assert torch.equal(before, after), "a later task changed task 0's outputs"
    # the trunk never moved; each task's copy trained away from the pretrained stage, and from the other task's
    for n, p in model.backbone.named_parameters():
        if n in trunk:
            assert torch.equal(p, trunk[n]), n
    for n, b in model.backbone.named_buffers():  # the trunk's BatchNorm statistics are shared: they never move
        if n in buffers:
            assert torch.equal(b, buffers[n]), n
    copies = [m for m in model.modules() if isinstance(m, TaskCopy)]
    assert len(copies) == 3 and all(c.trained_tasks() == [0, 1] for c in copies)
    w = "conv1.weight"
    assert not torch.equal(copies[0].bank["0"].get_parameter(w), pretrained[f"0.{w}"])
    assert not torch.equal(copies[0].bank["1"].get_parameter(w), copies[0].bank["0"].get_parameter(w))
    assert torch.equal(copies[0].pretrained.get_parameter(w), pretrained[f"0.{w}"])
    assert len(starts) == 2 and all(torch.equal(s, pretrained[f"0.{w}"]) for s in starts)  # every task from pretrained
    # stored: the model with one stage, plus one stage per task; a sample uses one stage and one head
    stage = sum(p.numel() for p in pretrained.values())
    body = sum(t.numel() for t in trunk.values()) + stage  # (the backbone's head is an Identity)
    heads = sum(p.numel() for p in model.head.parameters())
    rep = strategy.method_plugin.parameter_report(model)
    assert rep["stored"] == body + heads + 2 * stage and rep["inference"] == body + heads


def test_a_class_incremental_model_and_replay_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="use --task-incremental"):
        Growing(model=cifar_resnet(20, 10))
    from avalanche.training.plugins import ReplayPlugin

    strategy = Growing(model=TaskIncrementalClassifier(cifar_resnet(20, 10), 2), plugins=[ReplayPlugin(mem_size=10)])
    with pytest.raises(ValueError, match="drop the replay"):
        strategy.train(_data(tmp_path).train_stream[0])
