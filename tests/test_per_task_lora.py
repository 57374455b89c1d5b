"""Per-task LoRA: zero forgetting by construction in task-IL, exact parameter growth, routing, class-IL inference."""

import numpy as np
import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from experiments.benchmarks import split_cifar10
from models import (
    TaskBatchNorm,
    TaskIncrementalClassifier,
    TaskLoRAConv2d,
    TaskLoRALinear,
    cifar_resnet,
    count_parameters,
    set_task_routing,
    vit_cifar,
)
from strategies import FreezeBatchNormPlugin, PerTaskLoRA

RESNET = r"backbone\.layer\d\.\d+\.conv[12]"


def _data(tmp_path, task_id):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 6)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    x[..., 2] = (y * 25)[:, None, None]
    path = tmp_path / "c10.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[::3], y_test=y[::3])
    return split_cifar10(2, seed=0, data=path, return_task_id=task_id)


def _strategy(model, **kw):
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    return PerTaskLoRA(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                       train_mb_size=10, eval_mb_size=20, evaluator=evaluator, **kw)


@pytest.mark.parametrize("mode", ["kxk_1x1", "loralib"])
def test_task_il_earlier_outputs_bit_identical_and_growth_exact(tmp_path, mode):
    bm = _data(tmp_path, True)
    model = TaskIncrementalClassifier(cifar_resnet(20, 10), 5)
    strategy = _strategy(model, target_modules=RESNET, r=2, conv_mode=mode, trainable_modules=r"head",
                         per_task_bn=True)
    x0 = torch.stack([s[0] for s in bm.test_stream[0].dataset])
    t0 = torch.zeros(len(x0), dtype=torch.long)
    strategy.train(bm.train_stream[0])
    model.eval()
    with torch.no_grad():
        set_task_routing(model, t0)
        y_before = model(x0, t0).clone()
    counts0 = strategy.method_plugin.parameter_report(model)
    strategy.train(bm.train_stream[1])
    model.eval()
    with torch.no_grad():
        set_task_routing(model, t0)
        y_after = model(x0, t0)
    assert torch.equal(y_before, y_after), "per-task LoRA must not change earlier tasks' outputs at all"
    # the task-1 adapter really trained and differs from task 0's
    layer = model.backbone.layer2[0].conv1
    assert isinstance(layer, TaskLoRAConv2d) and layer.trained_tasks() == [0, 1]
    assert (layer.bank_B["1"] - layer.bank_B["0"]).abs().max() > 0
    # growth per task: exactly one adapter set + one BN copy set (+ one head, counted by the model)
    adapter = sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, TaskLoRAConv2d))
    bn = sum(p.numel() for m in model.modules() if isinstance(m, TaskBatchNorm) for p in m.bn.parameters())
    counts1 = strategy.method_plugin.parameter_report(model)
    head = sum(p.numel() for p in model.head.classifiers["1"].parameters())
    assert counts1["stored"] - counts0["stored"] == adapter + bn + head
    assert counts1["per_task"] == {0: adapter + bn, 1: adapter + bn}
    # one sample uses one task's adapter and BN copy: not the other task's, nor the pretrained BN (pretraining task)
    assert counts1["inference"] == counts1["stored"] - adapter - bn - bn


def test_untrained_task_label_is_refused(tmp_path):
    bm = _data(tmp_path, True)
    model = TaskIncrementalClassifier(cifar_resnet(20, 10), 5)
    strategy = _strategy(model, target_modules=RESNET, r=2, trainable_modules=r"head",
                         plugins=[FreezeBatchNormPlugin()])
    strategy.train(bm.train_stream[0])
    with pytest.raises(ValueError, match=r"never trained"):
        strategy.eval(bm.test_stream[1:2])


def test_mixed_task_batch_routes_each_sample():
    layer = TaskLoRALinear(torch.nn.Linear(6, 4), r=2)
    for t in (0, 1):
        layer.current_task = t
        with torch.no_grad():
            layer.lora_B.normal_()
        layer.store_adapter(t)
    x = torch.randn(5, 6)
    labels = torch.tensor([0, 1, 1, 0, 1])
    layer.task_labels = labels
    mixed = layer(x)
    for t in (0, 1):
        layer.task_labels = t
        torch.testing.assert_close(mixed[labels == t], layer(x)[labels == t])
    with pytest.raises(RuntimeError, match="not merged"):
        layer.merge()


def test_class_il_infers_the_task(tmp_path):
    bm = _data(tmp_path, False)
    model = cifar_resnet(20, 10)
    strategy = _strategy(model, target_modules=r"layer\d\.\d+\.conv[12]", r=2, class_incremental=True,
                         plugins=[FreezeBatchNormPlugin()])
    for exp in bm.train_stream:
        strategy.train(exp)
    res = strategy.eval(bm.test_stream)
    plugin = strategy.method_plugin
    assert plugin.trained_tasks == [0, 1] and sorted(plugin.task_classes[0] + plugin.task_classes[1]) == list(range(10))
    x = torch.stack([s[0] for s in bm.test_stream[1].dataset])
    model.eval()
    out = plugin.infer(model, x)
    # each row keeps the logits of exactly one task's classes, the others sit below them
    assert torch.isfinite(out).all()
    tasks = [set(plugin.task_classes[0]), set(plugin.task_classes[1])]
    for row in out:
        assert set(row.topk(5).indices.tolist()) in tasks
    assert any(k.startswith("Top1_Acc_Stream") for k in res)


def test_state_dict_restores_banks(tmp_path):
    bm = _data(tmp_path, True)
    model = TaskIncrementalClassifier(vit_cifar(10, depth=1, embed_dim=24, num_heads=2), 5)
    strategy = _strategy(model, target_modules=["attn.qkv", "mlp.fc1"], r=2, trainable_modules=r"head")
    for exp in bm.train_stream:
        strategy.train(exp)
    fresh = TaskIncrementalClassifier(vit_cifar(10, depth=1, embed_dim=24, num_heads=2), 5)
    from strategies import PerTaskLoRAPlugin
    PerTaskLoRAPlugin(target_modules=["attn.qkv", "mlp.fc1"], r=2, trainable_modules=r"head").prepare(fresh)
    for t in (0, 1):  # heads are created by Avalanche's adaptation; make them before loading
        fresh.head.adaptation(bm.train_stream[t])
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    t1 = torch.ones(3, dtype=torch.long)
    model.eval(), fresh.eval()
    set_task_routing(model, t1), set_task_routing(fresh, t1)
    torch.testing.assert_close(fresh(x, t1), model(x, t1))
    assert count_parameters(fresh) == count_parameters(model)


def test_layer_refuses_untrained_task_label():
    layer = TaskLoRALinear(torch.nn.Linear(4, 4), r=2)
    layer.current_task = 0
    layer.store_adapter(0)
    layer.task_labels = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="Task label 3 was never trained"):
        layer(torch.randn(2, 4))
