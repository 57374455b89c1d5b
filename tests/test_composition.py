"""Every method plugin inside Avalanche's own strategies (``Naive``, ``Replay``, ``LwF``), benchmark generators
(``nc_benchmark``, ``class_incremental_benchmark``) and models (``SimpleCNN``, ``IncrementalClassifier``), as an
Avalanche user would put them together: adapters train, frozen weights stay, our metrics answer as in our own
strategies, replay and LwF change what masked methods learn."""

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.models import IncrementalClassifier, SimpleCNN
from avalanche.training import Naive, Replay
from avalanche.training.plugins import EvaluationPlugin, LwFPlugin
from torch import nn
from torch.utils.data import TensorDataset

from models import lora_layers
from strategies import (CoDyRA, CoDyRAPlugin, EBLoRA, EBLoRAPlugin, HiDeLoRA, HiDeLoRAPlugin, InfLoRA,
                        InfLoRAPlugin, MergeLoRA, MergeLoRAPlugin, OLoRA, OLoRAPlugin, PerTaskLoRA,
                        PerTaskLoRAPlugin, SDLoRA, SDLoRAPlugin, mask_logits_per_sample, parameter_report)
from strategies.inflora import left_singular

PLUGINS = {
    "merge_lora": (MergeLoRAPlugin, MergeLoRA, {}),
    "per_task_lora": (PerTaskLoRAPlugin, PerTaskLoRA, {}),
    "codyra": (CoDyRAPlugin, CoDyRA, {}),
    "eblora": (EBLoRAPlugin, EBLoRA, {}),
    "inflora": (InfLoRAPlugin, InfLoRA, {}),
    "sd_lora": (SDLoRAPlugin, SDLoRA, {}),
    "o_lora": (OLoRAPlugin, OLoRA, {}),
    "hide_lora": (HiDeLoRAPlugin, HiDeLoRA, dict(ca_epochs=2, n_centroids=2)),
}
MASKED = ("codyra", "inflora", "sd_lora", "o_lora", "hide_lora")


class _Planted(TensorDataset):
    """4 classes of 32×32 noise whose red channel's mean encodes the class (learnable in a few steps)."""

    def __init__(self, n_per_class: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(4).repeat_interleave(n_per_class)
        x = torch.randn(len(y), 3, 32, 32, generator=g) * 0.5
        x[:, 0] += (y.float()[:, None, None] - 1.5) * 1.5
        super().__init__(x, y)
        self.targets = y.tolist()


def _bm(task_labels=False):
    return nc_benchmark(_Planted(20, 0), _Planted(10, 1), 2, task_labels=task_labels, seed=0)


def _quiet():
    return EvaluationPlugin(loggers=[])


def _plugin(name, **kw):
    cls, _, extra = PLUGINS[name]
    return cls(r=2, **extra, **kw)


def _accuracy(model, stream):
    model.eval()
    hits = n = 0
    with torch.no_grad():
        for exp in stream:
            for x, y, *_ in torch.utils.data.DataLoader(exp.dataset, batch_size=64):
                hits += int((model(x).argmax(1) == y).sum())
                n += len(y)
    return hits / n


def _naive_or_ours(name, ours: bool):
    """The same run (seed, data, optimizer, Avalanche's optimizer-state handling) inside Avalanche's ``Naive`` with
    the plugin, or inside our strategy."""
    torch.manual_seed(0)
    bm = _bm()
    model = SimpleCNN(num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if ours:
        strategy = PLUGINS[name][1](model=model, r=2, **PLUGINS[name][2], optimizer=opt, train_mb_size=16,
                                    reset_optimizer_state=False, evaluator=_quiet())
    else:  # target_modules="auto": every conv of SimpleCNN, not its head
        strategy = Naive(model=model, optimizer=opt, train_mb_size=16, plugins=[_plugin(name)], evaluator=_quiet())
    for exp in bm.train_stream:
        strategy.train(exp)
        strategy.eval(bm.test_stream[: exp.current_experience + 1])
    return strategy, model, before


@pytest.mark.slow  # two whole strategies trained per method
@pytest.mark.parametrize("name", list(PLUGINS))
def test_plugin_trains_inside_avalanche_naive_and_metrics_match_our_strategy(name):
    strategy, model, before = _naive_or_ours(name, ours=False)
    layers = lora_layers(model)
    assert layers and all(n.startswith("features.") for n, _ in layers)
    after = model.state_dict()
    merged = name in ("merge_lora", "codyra", "eblora")  # these merge each task's update into the base weight
    for n, layer in layers:
        assert torch.equal(after[f"{n}.base_layer.weight"], before[f"{n}.weight"]) != merged
    adapters = [p for _, m in layers for p in m.adapter_parameters()] + [
        p for _, m in layers for k in ("bank_A", "bank_B") for p in getattr(m, k, {}).values()]
    assert any(float(p.detach().abs().sum()) > 0 for p in adapters)
    # the growth metric finds the plugin among strategy.plugins: the counts of our own strategy on the same run
    ours, _, _ = _naive_or_ours(name, ours=True)
    assert parameter_report(strategy) == parameter_report(ours)


def test_growth_metric_refuses_adapters_without_their_plugin():
    from avalanche.training.templates import SupervisedTemplate

    model = SimpleCNN(num_classes=4)
    plugin = _plugin("inflora")
    plugin.prepare(model)
    strategy = SupervisedTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  evaluator=_quiet())
    with pytest.raises(ValueError, match="no plugin of the strategy reports"):
        parameter_report(strategy)


def test_masked_loss_scores_each_sample_over_its_own_experience():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 0.5, 0.2], [0.0, 9.0, 1.0, 2.0]], requires_grad=True)
    y = torch.tensor([2, 0, 3])  # current classes {2, 3}; sample 1 is replayed (class 0), seen {0, 1, 2, 3}
    out = mask_logits_per_sample(logits, y, [2, 3], [0, 1, 2, 3])
    # current samples: only columns 2, 3 kept; the replayed one: every seen class
    assert torch.equal(out[0, 2:], logits[0, 2:]) and (out[0, :2] < logits[0, 2:].min() - 999).all()
    assert torch.equal(out[1], logits[1])
    out.sum().backward()
    assert logits.grad.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    # replayed samples get a loss of the order of a few units, not the ~1e3 of a constant mask
    loss = nn.functional.cross_entropy(out, y, reduction="none")
    assert float(loss[1]) < 10


def _masked_run(name, replay=False, lwf=False):
    torch.manual_seed(0)
    bm = _bm()
    model = SimpleCNN(num_classes=4)
    plugins = [_plugin(name)] + ([LwFPlugin(alpha=1.0)] if lwf else [])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = dict(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=2,
              plugins=plugins, evaluator=_quiet())
    strategy = Replay(mem_size=20, **kw) if replay else Naive(**kw)
    for exp in bm.train_stream:
        strategy.train(exp)
    return model, _accuracy(model, bm.test_stream[:1])


@pytest.mark.slow  # three strategies trained per method
@pytest.mark.parametrize("name", MASKED)
def test_replay_does_not_hurt_and_lwf_is_not_a_no_op_for_masked_methods(name):
    plain, acc_plain = _masked_run(name)
    _, acc_replay = _masked_run(name, replay=True)
    assert acc_replay >= acc_plain, f"replay lowered the first task's accuracy: {acc_plain} -> {acc_replay}"
    distilled, _ = _masked_run(name, lwf=True)
    differ = [k for k, v in plain.state_dict().items() if not torch.equal(v, distilled.state_dict()[k])]
    assert differ, "LwF changed nothing: its distillation saw masked (constant) logits"


def test_per_task_lora_class_incremental_on_class_incremental_benchmark():
    """No task labels in the mini-batches (Avalanche's class_incremental_benchmark): the plugin infers it."""
    torch.manual_seed(0)
    ds = as_classification_dataset(_Planted(20, 0))
    bm = class_incremental_benchmark({"train": ds, "test": as_classification_dataset(_Planted(10, 1))},
                                     num_experiences=2, seed=0)
    model = SimpleCNN(num_classes=4)
    plugin = _plugin("per_task_lora")
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=16,
                     plugins=[plugin], evaluator=_quiet())
    for exp in bm.train_stream:
        strategy.train(exp)
    strategy.eval(bm.test_stream)
    assert plugin.class_incremental is True and plugin.trained_tasks == [0, 1]


def test_per_task_lora_routes_replayed_samples_to_their_own_adapter():
    """Task-IL with replay: every training sample goes through the adapter of its own task label (replayed
    samples of task 0 through task 0's frozen adapter), so the new adapter never trains on old data and the old
    heads train on the features they are served with."""
    from avalanche.core import SupervisedPlugin
    from avalanche.models import MTSimpleCNN

    from models.task_lora import TaskLoRAMixin

    routed = []

    class Spy(SupervisedPlugin):
        def before_forward(self, strategy, **kwargs):  # after the method plugin's (plugin order)
            layer = next(m for m in strategy.model.modules() if isinstance(m, TaskLoRAMixin))
            routed.append((strategy.mb_task_id.clone(), layer.task_labels))

    torch.manual_seed(0)
    bm = _bm(task_labels=True)
    model = MTSimpleCNN()
    strategy = Replay(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), mem_size=20,
                      criterion=nn.CrossEntropyLoss(),
                      train_mb_size=16, evaluator=_quiet(),
                      plugins=[_plugin("per_task_lora", target_modules=r"features\.(0|2|6|8|12)"), Spy()])
    strategy.train(bm.train_stream[0])
    bank = {k: v.clone() for k, v in model.state_dict().items() if ".bank_" in k}
    routed.clear()
    strategy.train(bm.train_stream[1])
    assert any(len(set(t.tolist())) == 2 for t, _ in routed), "replay should mix both tasks in mini-batches"
    for labels, route in routed:
        assert torch.equal(torch.as_tensor(route), labels)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bank.items())


def test_hide_lora_grows_with_avalanche_incremental_classifier():
    torch.manual_seed(0)
    bm = _bm()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = SimpleCNN().features
            self.head = IncrementalClassifier(64, initial_out_features=2)

        def forward(self, x):
            return self.head(self.features(x).flatten(1))

    model = Net()
    plugin = _plugin("hide_lora")
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), train_mb_size=16,
                     plugins=[plugin], evaluator=_quiet())
    for exp in bm.train_stream:
        strategy.train(exp)
    strategy.eval(bm.test_stream)
    assert plugin.shared_model.head.classifier.out_features == 4 == model.head.classifier.out_features


def test_sd_lora_with_an_optimizer_of_two_parameter_groups():
    torch.manual_seed(0)
    bm = _bm()
    model = SimpleCNN(num_classes=4)
    head = list(model.classifier.parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    opt = torch.optim.SGD([dict(params=rest, lr=0.05), dict(params=head, lr=0.01)], lr=0.02, momentum=0.9)
    plugin = _plugin("sd_lora")
    strategy = Naive(model=model, optimizer=opt, train_mb_size=16, plugins=[plugin], evaluator=_quiet())
    for exp in bm.train_stream:
        strategy.train(exp)
    mags = list(model.sd_lora_magnitudes.parameters())
    group = [g for g in opt.param_groups if any(p is mags[0] for p in g["params"])]
    assert len(group) == 1 and group[0]["lr"] == 0.02  # their own group, with the optimizer's defaults
    assert all(any(p is m for p in group[0]["params"]) for m in mags)


def test_inflora_decomposition_survives_an_ill_conditioned_covariance(monkeypatch):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -9, 40, dtype=torch.float64)
    H = X.T @ X  # condition number ~1e18
    U, E = left_singular(H)
    Us, S, _ = torch.linalg.svd(H)
    torch.testing.assert_close(U.T @ U, torch.eye(40, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(E[:5], S[:5] ** 2, rtol=1e-8, atol=0)
    # eigh failing to converge (seen on a 4,608² ResNet-18 covariance): the jittered retry, then the SVD

    calls = []

    def failing_eigh(M):
        calls.append(1)
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    U2, E2 = left_singular(H)
    assert len(calls) == 2
    torch.testing.assert_close(E2, S ** 2)
    torch.testing.assert_close((U2[:, :3].T @ Us[:, :3]).abs(), torch.eye(3, dtype=torch.float64), atol=1e-6,
                               rtol=0)


def test_inflora_psd_decomposition_equals_the_svd():
    """A covariance's own eigendecomposition (``psd=True``, no Gram product) gives the SVD's singular vectors and
    squared singular values, as the Gram form does."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 30, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 30, dtype=torch.float64)
    H = X.T @ X / 200
    Us, S, _ = torch.linalg.svd(H)
    for U, E in (left_singular(H, psd=True), left_singular(H)):
        torch.testing.assert_close(E, S ** 2, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close((U[:, :5].T @ Us[:, :5]).abs(), torch.eye(5, dtype=torch.float64), atol=1e-8,
                                   rtol=0)


def test_inflora_top_r_singular_vectors_equal_the_svds():
    """Only the top r eigenpairs (LAPACK's subset driver) for the designed A: the SVD's top r left singular vectors
    of a covariance and of a projected (non-symmetric) one, up to sign; r >= d falls back to the full form."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.linspace(4, 0.2, 24, dtype=torch.float64)
    H = X.T @ X / 300
    F_ = torch.linalg.qr(torch.randn(24, 5, generator=g, dtype=torch.float64))[0]
    for M, psd in ((H, True), (H - F_ @ (F_.T @ H), False)):
        Us = torch.linalg.svd(M)[0][:, :4]
        U, E = left_singular(M, psd=psd, top=4)
        assert U.shape == (24, 4)
        torch.testing.assert_close((U.T @ Us).abs(), torch.eye(4, dtype=torch.float64), atol=1e-8, rtol=0)
        torch.testing.assert_close(E, torch.linalg.svdvals(M)[:4] ** 2, rtol=1e-9, atol=1e-12)
    assert left_singular(H[:3, :3], psd=True, top=5)[0].shape == (3, 3)


def test_pretrained_batchnorm_in_train_mode_is_warned_once(resnet32_weights):
    from models import cifar_resnet
    from strategies import FreezeBatchNormPlugin

    bm = _bm()
    model = cifar_resnet(32, 4, weights=str(resnet32_weights))
    s = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), train_mb_size=16,
              plugins=[_plugin("merge_lora")], evaluator=_quiet())
    with pytest.warns(UserWarning, match="FreezeBatchNormPlugin"):
        s.train(bm.train_stream[0])
    model = cifar_resnet(32, 4, weights=str(resnet32_weights))
    s = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), train_mb_size=16,
              plugins=[_plugin("merge_lora"), FreezeBatchNormPlugin()], evaluator=_quiet())
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*FreezeBatchNormPlugin.*")
        s.train(bm.train_stream[0])


@pytest.mark.slow  # two whole strategies trained per method
@pytest.mark.parametrize("name", list(PLUGINS))
def test_every_plugin_trains_inside_replay_with_lwf(name):
    torch.manual_seed(0)
    bm = _bm()
    model = SimpleCNN(num_classes=4)
    strategy = Replay(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), mem_size=20,
                      criterion=nn.CrossEntropyLoss(), train_mb_size=16, evaluator=_quiet(),
                      plugins=[_plugin(name), LwFPlugin(alpha=1.0)])
    for exp in bm.train_stream:
        strategy.train(exp)
    strategy.eval(bm.test_stream)
    assert len(lora_layers(model)) == 5 and parameter_report(strategy)["stored"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
