"""HiDe-LoRA: warm start and momentum blend of the pool, classifier alignment trains only the head, task-identity
inference routes every sample to its task's slot, statistics and sampling, bad input."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from conftest import small_model

from models import TaskIncrementalClassifier, TaskLoRAMixin, set_task_routing
from strategies import HiDeLoRA, TaskInferenceAccuracyPluginMetric, class_statistics, sample_features


class _Watch(SupervisedPlugin):
    """Runs after HiDe's own callbacks: the slot at the start of each experience and at the end of its training."""

    def __init__(self):
        super().__init__()
        self.start, self.end = [], []

    def _slots(self, strategy):
        return [(m.lora_A.detach().clone(), m.lora_B.detach().clone())
                for m in strategy.model.modules() if isinstance(m, TaskLoRAMixin)]

    def before_training_exp(self, strategy, **kwargs):
        self.start.append(self._slots(strategy))

    def after_training_epoch(self, strategy, **kwargs):
        self.end.append(self._slots(strategy))


def _strategy(backbone, **kw):
    model, targets = small_model(backbone)
    watch = _Watch()
    tii = TaskInferenceAccuracyPluginMetric()
    strategy = HiDeLoRA(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                        target_modules=targets, r=2, ca_epochs=3, n_centroids=3, train_mb_size=8,
                        plugins=[watch], evaluator=EvaluationPlugin(accuracy_metrics(experience=True), tii,
                                                                    loggers=[]), **kw)
    return strategy, model, watch


@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_pool_warm_start_momentum_and_routed_inference(tiny_bm, backbone):
    strategy, model, watch = _strategy(backbone, lora_momentum=0.25)
    plugin = strategy.method_plugin
    for i, exp in enumerate(tiny_bm.train_stream):
        strategy.train(exp)
        strategy.eval(tiny_bm.test_stream[: i + 1])
    pool = [m for m in model.modules() if isinstance(m, TaskLoRAMixin)]
    for m, (a1, b1), (a_end, b_end) in zip(pool, watch.start[1], watch.end[1]):
        # slot 1 started as slot 0 and trained
        assert torch.equal(a1, m.bank_A["0"]) and torch.equal(b1, m.bank_B["0"])
        assert not torch.equal(b_end, b1)
        # then was blended with the mean of the earlier slots
        torch.testing.assert_close(m.bank_A["1"], 0.75 * a_end + 0.25 * m.bank_A["0"])
        torch.testing.assert_close(m.bank_B["1"], 0.75 * b_end + 0.25 * m.bank_B["0"])
    # the shared model is a separate copy with its own (plain) LoRA and head
    shared_layers = [m for m in plugin.shared_model.modules() if hasattr(m, "lora_A")]
    assert shared_layers and not any(isinstance(m, TaskLoRAMixin) for m in shared_layers)
    assert all(m.lora_B.abs().max() > 0 for m in shared_layers), "the shared LoRA must train"
    # inference: each sample goes through the slot of the task the shared model infers for it
    x = torch.stack([tiny_bm.test_stream[j].dataset[i][0] for j in range(2) for i in range(3)])
    model.eval()
    with torch.no_grad():
        pred = plugin.infer_tasks(x)
        set_task_routing(model, pred)
        batched = model(x)
        for i in range(len(x)):
            set_task_routing(model, int(pred[i]))
            torch.testing.assert_close(batched[i], model(x[i: i + 1])[0], atol=1e-5, rtol=1e-5)
    # task-identity inference accuracy is reported per experience and for the stream
    last = strategy.evaluator.get_last_metrics()
    tii = [v for k, v in last.items() if k.startswith("TII_Acc_Exp")]
    assert len(tii) == 2 and all(0.0 <= v <= 1.0 for v in tii)
    assert "TII_Acc_Stream/eval_phase/test_stream" in last
    # statistics for every seen class, and the report counts them as stored (not for inference)
    assert sorted(plugin.stats) == sorted(plugin.seen_classes) == sorted(plugin.shared_stats)
    rep = plugin.parameter_report(model)
    assert rep["stored"] > rep["inference"]


def test_classifier_alignment_changes_only_the_head(tiny_bm):
    strategy, model, _ = _strategy("resnet")
    plugin = strategy.method_plugin
    for exp in tiny_bm.train_stream:
        strategy.train(exp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shared_before = {k: v.clone() for k, v in plugin.shared_model.state_dict().items()}
    head = plugin._head(model)
    plugin.align_classifier(head, plugin.stats, 16, steps=10, seed=1)
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["linear.bias", "linear.weight"], changed
    assert all(torch.equal(v, plugin.shared_model.state_dict()[k]) for k, v in shared_before.items())
    # the aligned head separates features sampled from the statistics better than chance, on the seen classes
    X, y = sample_features(plugin.stats, 20, torch.Generator().manual_seed(5))
    seen = torch.tensor(plugin.seen_classes)
    with torch.no_grad():
        acc = (seen[head(X)[:, seen].argmax(1)] == y).float().mean().item()
    assert acc > 2.0 / len(seen)


def test_statistics_and_sampling():
    torch.manual_seed(0)
    X = torch.cat([torch.randn(30, 5) + 5, torch.randn(30, 5) - 5])
    s = class_statistics(X, "multi-centroid", n_centroids=2, seed=0)
    assert s["means"].shape == (2, 5) and s["vars"].shape == (2, 5)
    assert sorted(s["means"][:, 0].round().tolist()) == pytest.approx([-5, 5], abs=1)
    c = class_statistics(X, "covariance")
    assert c["cov"].shape == (5, 5) and torch.allclose(c["cov"], c["cov"].T)
    Xs, ys = sample_features({3: c, 7: s}, 4000, torch.Generator().manual_seed(0))
    assert Xs.shape == (4000 + 2 * 4000, 5) and sorted(set(ys.tolist())) == [3, 7]
    torch.testing.assert_close(Xs[ys == 3].mean(0), c["means"][0], atol=0.2, rtol=0)
    with pytest.raises(ValueError, match="Unknown classifier-alignment method"):
        class_statistics(X, "gmm")


def test_hide_refuses_task_incremental_and_an_injected_model():
    model, targets = small_model("resnet")
    til = TaskIncrementalClassifier(model, 2)
    s = HiDeLoRA(model=til, optimizer=torch.optim.SGD(til.parameters(), lr=0.1), target_modules=targets,
                 evaluator=EvaluationPlugin(loggers=[]))
    with pytest.raises(ValueError, match="class-incremental"):
        s.method_plugin.prepare(til)
    from models import TaskLoRALinear, add_lora

    vit, t = small_model("vit")
    add_lora(vit, t, r=2, linear_cls=TaskLoRALinear)
    s = HiDeLoRA(model=vit, optimizer=torch.optim.SGD(vit.parameters(), lr=0.1), target_modules=t,
                 evaluator=EvaluationPlugin(loggers=[]))
    with pytest.raises(ValueError, match="before any LoRA is injected"):
        s.method_plugin.prepare(vit)


def test_contrastive_loss_prefers_separated_features():
    from strategies import HiDeLoRAPlugin

    p = HiDeLoRAPlugin(target_modules="x")
    apart = torch.eye(4) * 10
    together = torch.ones(4, 4)
    assert p.contrastive_loss(apart).item() < 1e-6 < p.contrastive_loss(together).item()
