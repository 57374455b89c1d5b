"""Our Avalanche metrics against hand-computed values, the summary figures, and the plots."""

import json
from types import SimpleNamespace as NS

import pytest
import torch
from torch import nn

from experiments.plot import forgetting_curve, main as plot_main
from experiments.run import main as run_main, summarize
from models import GateLoRALinear, LoRALinear, TaskLoRALinear, add_lora
from strategies import (
    AccuracyCurvePluginMetric,
    MergeLoRAPlugin,
    ParameterGrowthPluginMetric,
    PerTaskLoRAPlugin,
    PretrainingRetentionPluginMetric,
    RankUsagePluginMetric,
    SpectralEnergyPluginMetric,
)


def _strategy(model=None, **kw):
    clock = NS(train_iterations=7, train_exp_counter=0, train_exp_epochs=0)
    return NS(model=model, clock=clock, device="cpu", train_epochs=1, experience=NS(current_experience=0), **kw)


def _logits(correct: list[bool], n_classes=3):
    """Outputs whose argmax is the label where ``correct`` and another class elsewhere."""
    y = torch.tensor([i % n_classes for i in range(len(correct))])
    out = torch.zeros(len(correct), n_classes)
    for i, ok in enumerate(correct):
        out[i, y[i] if ok else (y[i] + 1) % n_classes] = 1.0
    return out, y


def test_accuracy_curve_last_and_average():
    metric = AccuracyCurvePluginMetric()
    s = _strategy()

    def evaluate(trained, per_exp):
        s.clock.train_exp_counter = trained
        metric.before_eval(s)
        for e, correct in per_exp.items():
            s.experience = NS(current_experience=e, origin_stream=NS(name="test"))
            s.mb_output, s.mb_y = _logits(correct)
            metric.after_eval_iteration(s)
        return metric.after_eval(s)

    # after experience 0: exp 0 3/4 right; exp 1 (not trained yet) is left out
    vals = evaluate(1, {0: [True, True, True, False], 1: [True] * 4})
    assert [v.value for v in vals] == [0.75, 0.75]
    # after experience 1: exp 0 1/4, exp 1 4/4 -> last (0.25 + 1) / 2 = 0.625, avg (0.75 + 0.625) / 2
    vals = evaluate(2, {0: [True, False, False, False], 1: [True] * 4})
    assert vals[0].value == pytest.approx(0.625) and vals[1].value == pytest.approx(0.6875)
    assert vals[0].name == "Acc_Last/eval_phase/test_stream"
    assert metric.result() == dict(last=0.625, avg=0.6875, curve=[0.75, 0.625])


def test_summarize_forward_transfer_and_pilot_names():
    m = [[0.9, 0.3, 0.2], [0.6, 0.8, 0.4], [0.3, 0.5, 0.7]]
    s = summarize(m, initial=[0.1, 0.2, 0.1])
    assert s["forward_transfer"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.1)) / 2)
    assert s["A_last"] == pytest.approx(0.5) and s["A_avg"] == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert forgetting_curve(m)[1:] == pytest.approx([0.3, (0.6 + 0.3) / 2])
    # Avalanche's forgetting: accuracy right after learning j minus the final one (positive = forgotten); BWT the
    # final minus right after (negative = forgotten), over every experience but the last
    assert s["forgetting_per_experience"] == pytest.approx([0.9 - 0.3, 0.8 - 0.5])
    assert s["average_forgetting"] == pytest.approx(0.45) and s["bwt"] == pytest.approx(-0.45)
    gained = summarize([[0.5, 0.1], [0.7, 0.9]])  # the first task improved later: negative forgetting, positive BWT
    assert gained["average_forgetting"] == pytest.approx(-0.2) and gained["bwt"] == pytest.approx(0.2)


def test_parameter_growth_merged_and_per_task():
    model = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 3))  # 115 parameters
    add_lora(model, ["0"], r=2)  # adapter 2*10 + 8*2 = 36
    metric = ParameterGrowthPluginMetric()
    s = _strategy(model, method_plugin=MergeLoRAPlugin())
    metric.before_training(s)
    assert metric.backbone == 115
    vals = {v.name.split("/")[0]: v.value for v in metric.after_training_exp(s)}
    assert vals["ParamCount_stored"] == 115 and vals["ParamCount_adapter"] == 36 and vals["ParamGrowth_pct"] == 0

    model = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 3))
    add_lora(model, ["0"], r=2, linear_cls=TaskLoRALinear)
    plugin = PerTaskLoRAPlugin()
    metric = ParameterGrowthPluginMetric()
    s = _strategy(model, method_plugin=plugin)
    metric.before_training(s)
    for t in (0, 1):
        model[0].current_task = t
        model[0].store_adapter(t)
        plugin.trained_tasks.append(t)
    vals = {v.name.split("/")[0]: v.value for v in metric.after_training_exp(s)}
    # two stored adapters (the current one is training state): 115 + 2*36; one forward uses one of them
    assert vals["ParamCount_stored"] == 115 + 72 and vals["ParamCount_inference"] == 115 + 36
    assert vals["ParamGrowth_pct"] == pytest.approx(100 * 72 / 115)


def test_parameter_growth_per_task_batchnorm_inference():
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))  # 88 + 16 + 27 = 131 parameters
    plugin = PerTaskLoRAPlugin(target_modules=["0"], r=2, per_task_bn=True)  # adapter 2*10 + 8*2 = 36
    plugin.prepare(model)
    metric = ParameterGrowthPluginMetric()
    s = _strategy(model, method_plugin=plugin)
    for t in (0, 1):
        model[0].current_task = model[1].current_task = t
        model[0].store_adapter(t)
        model[1].store(t)
        plugin.trained_tasks.append(t)
    vals = {v.name.split("/")[0]: v.value for v in metric.after_training_exp(s)}
    # stored: the backbone and, per task, its adapter and BatchNorm copy (the live copy is training state)
    assert vals["ParamCount_stored"] == 131 + 2 * (36 + 16)
    # one forward pass: Linear 0, the task's adapter, the task's BatchNorm copy (not the backbone's), Linear 2
    assert vals["ParamCount_inference"] == 88 + 36 + 16 + 27


def test_pretraining_retention_through_original_head():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))  # its own head is never used by the metric
    with torch.no_grad():
        model[1].weight.fill_(0.0)
    original = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        original.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 1])
    metric = PretrainingRetentionPluginMetric(list(zip(x, y)), original, batch_size=3)
    s = _strategy(model)
    model.train()
    vals = metric.after_training_exp(s)
    assert vals[0].value == 0.75 and metric.history == [0.75]
    assert model.training and isinstance(model[1], nn.Linear) and model[1].weight.abs().sum() == 0  # restored


def test_rank_usage_gates_and_numerical_rank():
    model = nn.Sequential(GateLoRALinear(nn.Linear(6, 6), r=4), LoRALinear(nn.Linear(6, 6), r=3))
    with torch.no_grad():
        model[0].lora_gate.copy_(torch.tensor([1.0, 0.0, 0.5, 0.0]))
        model[1].lora_B.normal_()
    metric = RankUsagePluginMetric()
    s = _strategy(model)
    metric.after_training_epoch(s)  # last epoch of the experience
    model[1].merge_and_reset()  # what a method does afterwards must not change what was measured
    vals = metric.after_training_exp(s)
    assert metric.history == [{"0": 2, "1": 3}] and vals[0].value == 2.5


def test_spectral_energy_flat_and_rank_one():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(8, 8), r=4), LoRALinear(nn.Linear(8, 8), r=2))
    q = torch.linalg.qr(torch.randn(8, 8))[0]
    metric = SpectralEnergyPluginMetric()
    s = _strategy(model)
    metric.before_training_exp(s)
    with torch.no_grad():
        model[0].lora_A.copy_(q[:4])  # orthonormal rows and columns: every singular value is 1
        model[0].lora_B.copy_(q[:, 4:])
        model[1].base_layer.weight.add_(3.0 * torch.outer(q[:, 0], q[:, 1]))  # a merged rank-1 update
    metric.after_training_epoch(s)
    vals = metric.after_training_exp(s)
    spec = metric.history[0]
    assert spec["0"]["top1_energy"] == pytest.approx(0.25, abs=1e-5)
    assert spec["0"]["singular_values"][:4] == pytest.approx([1.0] * 4, abs=1e-5)
    assert spec["1"]["top1_energy"] == pytest.approx(1.0, abs=1e-5)
    assert spec["1"]["singular_values"][0] == pytest.approx(3.0, abs=1e-5)
    assert vals[0].value == pytest.approx((0.25 + 1.0) / 2, abs=1e-5)


def _fake_run(path, name, acc, stored, ranks=None, spectra=None):
    d = path / name
    d.mkdir()
    m = [[acc, None], [acc - 0.2, acc]]
    res = dict(method=name, benchmark=dict(scenario="class-incremental"), accuracy_matrix=m,
               average_accuracy=[acc, acc - 0.1], final_average_accuracy=acc - 0.1, average_forgetting=0.2,
               bwt=-0.2, parameters=[dict(total=stored, stored=stored, inference=stored)] * 2,
               train_step_time_s=0.01, rank_usage=ranks, spectra=spectra)
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_plots_are_written_and_not_blank(tmp_path):
    import matplotlib.image as mpimg

    a = _fake_run(tmp_path, "codyra", 0.9, 1000, ranks=[{"l1": 4, "l2": 2}, {"l1": 3, "l2": 1}],
                  spectra=[{"l1": dict(singular_values=[2.0, 1.0, 0.5], top1_energy=0.76)}] * 2)
    b = _fake_run(tmp_path, "merge", 0.8, 900)
    out = tmp_path / "figs"
    assert plot_main([str(a), str(b), "--out", str(out)]) == 0
    for stem in ("codyra_accuracy_matrix", "codyra_ranks", "codyra_spectra", "merge_accuracy_matrix", "curves",
                 "accuracy_vs_parameters"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
        img = mpimg.imread(out / f"{stem}.png")
        assert img.std() > 0.01, f"{stem}.png is blank"
    assert not (out / "merge_ranks.png").exists()


def test_cli_writes_metrics_csv_tensorboard_and_results(tmp_path, capsys):
    from conftest import assert_learned, calibrated_resnet20, expected_parameters, made_data

    data = made_data(tmp_path / "d.npz", 4, 10)  # the class planted in two channels; test = train
    weights = calibrated_resnet20(data, tmp_path / "w.pt")  # random, BatchNorm calibrated: frozen, trains stably
    out = tmp_path / "run"
    assert run_main(["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--backbone",
                     "cifar_resnet20", "--backbone-weights", str(weights), "--method", "codyra", "--r", "2",
                     "--alpha", "0.5", "--batch-size", "4", "--epochs", "6", "--optimizer", "sgd", "--momentum", "0.9",
                     "--lr", "0.01", "--eval-on", "all", "--retention-data", str(data), "--out", str(out),
                     "--no-progress"]) == 0
    capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    assert len(res["pretraining_retention"]) == 2 and 0 <= res["pretraining_retention"][0] <= 1
    assert len(res["rank_usage"]) == 2 and len(res["spectra"]) == 2
    assert_learned(res, 0.2)  # class-IL: chance 1/2, then 1/4
    # the summary figures from the accuracy matrix (every test experience after every training one) by hand
    m, b = res["accuracy_matrix"], res["initial_accuracy"]
    assert None not in m[0] + m[1] + b
    assert res["average_accuracy"] == pytest.approx([m[0][0], (m[1][0] + m[1][1]) / 2])
    assert res["A_last"] == pytest.approx((m[1][0] + m[1][1]) / 2)
    assert res["A_avg"] == pytest.approx((m[0][0] + (m[1][0] + m[1][1]) / 2) / 2)
    assert res["average_forgetting"] == pytest.approx(m[0][0] - m[1][0])
    assert res["bwt"] == pytest.approx(m[1][0] - m[0][0])
    assert res["forward_transfer"] == pytest.approx(m[0][1] - b[1])
    # CoDyRA merges: the backbone and its 64->4 head are all that is stored
    assert [(p["stored"], p["inference"]) for p in res["parameters"]] == expected_parameters(res, "cifar_resnet20", 2)
    assert res["parameters"][-1]["growth_pct"] == pytest.approx(0.0)
    csv = (out / "metrics.csv").read_text()
    for name in ("ParamGrowth_pct", "Acc_Avg", "RankUsage_mean", "SpectralImbalance_mean", "PretrainRetention"):
        assert name in csv, name
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
