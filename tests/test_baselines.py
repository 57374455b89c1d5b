"""The comparison baselines (``--method ewc | lwf | replay | ncm | linear_probe | joint``), ``--replay``,
``--validation`` and the suite's pieces, each against a reference written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from experiments.run import parse_config, summarize


def _features(model, x):
    """The head's input, by a forward hook (the reference needs the features NCM's means are made of)."""
    from models import find_head

    out = []
    h = find_head(model)[1].register_forward_hook(lambda m, i, o: out.append(i[0]))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    return out[0]


def _stack(dataset):
    xs, ys = zip(*[(dataset[i][0], dataset[i][1]) for i in range(len(dataset))])
    return torch.stack(xs), torch.tensor(ys)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ncm_predicts_the_nearest_class_mean(tiny_bm, metric):
    """Nearest class mean by hand (means of the training features of every class seen, argmin distance or argmax
    cosine) equals the model's prediction after the strategy's passes, and nothing else moved."""
    from models import cifar_resnet
    from strategies.ncm import NearestClassMean

    model = cifar_resnet(20, 10)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("linear.")}  # all but the head
    s = NearestClassMean(model=model, metric=metric, train_mb_size=8, evaluator=EvaluationPlugin(loggers=[]))
    for exp in tiny_bm.train_stream:
        s.train(exp)
    xs, ys = zip(*[_stack(exp.dataset.eval()) for exp in tiny_bm.train_stream])
    f, y = _features(model, torch.cat(xs)), torch.cat(ys)
    classes = sorted(set(y.tolist()))
    mu = torch.stack([f[y == c].double().mean(0) for c in classes])
    xt, _ = _stack(tiny_bm.test_stream[0].dataset)
    ft = _features(model, xt).double()
    if metric == "euclidean":
        ref = torch.cdist(ft, mu).argmin(1)
    else:
        ref = (nn.functional.normalize(ft, dim=1) @ nn.functional.normalize(mu, dim=1).T).argmax(1)
    expected = torch.tensor(classes)[ref]
    with torch.no_grad():
        assert torch.equal(model.eval()(xt).argmax(1), expected)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the backbone must not move"
    assert expected.unique().numel() > 1  # a real choice among the means


def test_ncm_task_incremental_fills_each_tasks_head(tiny_bm):
    """Task-IL: each task's head holds its own classes' means; classes are local ids from 0 in each task."""
    from experiments.benchmarks import split_cifar10
    from models import TaskIncrementalClassifier, cifar_resnet
    from strategies.ncm import NearestClassMean

    path = tiny_bm.data_source.split(":", 1)[1]
    bm = split_cifar10(2, seed=0, data=path, return_task_id=True)
    model = TaskIncrementalClassifier(cifar_resnet(20, 10), 5)
    s = NearestClassMean(model=model, train_mb_size=8, evaluator=EvaluationPlugin(loggers=[]))
    for exp in bm.train_stream:
        s.train(exp)
    for t, exp in enumerate(bm.train_stream):
        x, y = _stack(exp.dataset.eval())
        with torch.no_grad():
            f = model.eval().backbone(x).double()
        head = model.head.classifiers[str(t)].classifier
        for c in y.unique().tolist():
            mu = f[y == c].mean(0)
            torch.testing.assert_close(head.weight[c].double(), mu, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(head.bias[c].double(), -0.5 * mu.pow(2).sum(), rtol=1e-5, atol=1e-4)


def test_linear_probe_trains_only_the_head(tiny_bm):
    from models import cifar_resnet
    from strategies.linear_probe import LinearProbe

    model = cifar_resnet(20, 10)
    before = {k: v.clone() for k, v in model.named_parameters()}
    s = LinearProbe(model=model, train_mb_size=8, evaluator=EvaluationPlugin(loggers=[]))
    s.train(tiny_bm.train_stream[0])
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert moved == {"linear.weight", "linear.bias"}


def test_ewc_reports_what_it_stores(tiny_bm):
    """Stored = model + one copy of every parameter and one importance per parameter, per experience (separate)."""
    from models import cifar_resnet
    from strategies.ewc import EWC
    from strategies.metrics import parameter_report

    model = cifar_resnet(20, 10)
    n = sum(p.numel() for p in model.parameters())
    s = EWC(model=model, ewc_lambda=10.0, train_mb_size=8, evaluator=EvaluationPlugin(loggers=[]))
    for k, exp in enumerate(tiny_bm.train_stream, 1):
        s.train(exp)
        rep = parameter_report(s)
        assert rep["stored"] == n + 2 * k * n and rep["inference"] == n


def test_lwf_reports_its_teacher(tiny_bm):
    from models import cifar_resnet
    from strategies.lwf import LwF
    from strategies.metrics import parameter_report

    model = cifar_resnet(20, 10)
    n = sum(p.numel() for p in model.parameters())
    s = LwF(model=model, train_mb_size=8, evaluator=EvaluationPlugin(loggers=[]))
    s.train(tiny_bm.train_stream[0])
    assert parameter_report(s)["stored"] == 2 * n


def test_joint_trains_once_on_every_experience(tiny_bm):
    """One training call sees the whole stream (every class's images), the heads of every task exist."""
    from models import cifar_resnet
    from strategies.joint import Joint

    model = cifar_resnet(20, 10)
    s = Joint(model=model, train_mb_size=16, evaluator=EvaluationPlugin(loggers=[]))
    s.train(list(tiny_bm.train_stream))
    seen = s.adapted_dataset.targets
    assert sorted(set(seen)) == list(range(10))
    assert len(seen) == sum(len(e.dataset) for e in tiny_bm.train_stream)
    with pytest.raises(Exception, match="trained only once"):
        s.train(list(tiny_bm.train_stream))


def test_summarize_joint_is_one_row_without_forgetting():
    r = summarize([[0.5, 0.7, 0.9]], joint=True)
    assert r["A_last"] == pytest.approx(0.7) and r["A_avg"] is None and r["average_forgetting"] is None


def test_validation_is_held_out_of_training_balanced_and_never_the_test_set(tmp_path):
    """``--validation N``: N training images per experience (N / classes each), none of them trained on, none from
    the test set; the training subset is drawn from the rest."""
    from experiments.benchmarks import arrays_benchmark

    y = np.repeat(np.arange(4), 30)
    x = np.arange(len(y) * 16, dtype=np.int64).reshape(len(y), 4, 4) % 251  # every image distinct
    x = np.stack([np.full((4, 4), i % 256, dtype=np.uint8) + 0 for i in range(len(y))])
    x[:, 0, 0] = np.arange(len(y)) // 256
    x[:, 0, 1] = np.arange(len(y)) % 256
    xt = x.copy()
    xt[:, 1, 1] = 255  # test images differ from every training image
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=y)
    bm = arrays_benchmark(tmp_path / "d.npz", 2, seed=0, validation=10, subset=20, to_rgb=False,
                          normalization=((0.0,), (1.0,)))

    def ids(ds):
        out = []
        for i in range(len(ds)):
            img = ds[i][0]
            out.append(int(round(float(img[0, 0, 0]) * 255)) * 256 + int(round(float(img[0, 0, 1]) * 255)))
        return out

    val = [i for e in bm.test_stream for i in ids(e.dataset)]
    train = [i for e in bm.train_stream for i in ids(e.dataset)]
    assert len(val) == 20 and len(train) == 40  # 5 per class, 10 per class
    assert not set(val) & set(train)
    assert all(0 <= i < len(y) for i in val)  # ids of training images, not test images
    assert sorted(np.bincount(y[val])) == [5, 5, 5, 5]


def test_replay_flag_composes_and_refuses_what_it_cannot_do(tmp_path):
    cfg = parse_config(["--method", "sd_lora", "--replay", "50", "--out", str(tmp_path / "a")])
    assert cfg["replay"] == 50
    with pytest.raises(ValueError, match="--mem-size"):
        parse_config(["--method", "replay", "--replay", "50"])
    with pytest.raises(ValueError, match="joint"):
        parse_config(["--method", "joint", "--replay", "50"])
    with pytest.raises(SystemExit):
        parse_config(["--method", "naive", "--replay", "many"])
    with pytest.raises(ValueError, match="--replay must be an integer >= 1"):
        parse_config(["--method", "naive", "--replay", "0"])


def test_suite_grid_extends_only_at_its_ends():
    from experiments.suite import _extend

    runs = lambda accs: [({"lr": lr}, a) for lr, a in zip((0.003, 0.01, 0.03), accs)]  # noqa: E731
    assert _extend(runs([0.9, 0.6, 0.5]), 2) == 0.001
    assert _extend(runs([0.5, 0.6, 0.9]), 2) == 0.09
    assert _extend(runs([0.5, 0.9, 0.6]), 2) is None
    assert _extend(runs([None, None, None]), 1) == 0.001  # everything diverged: go lower
    assert _extend(runs([None, 0.6, 0.5]), 1) is None
    assert _extend(runs([0.9, 0.6, 0.5]), 0) is None  # no extension left


def test_suite_protocols_load_and_name_what_is_missing(monkeypatch):
    from experiments.suite import _cli, load_protocol, plan

    monkeypatch.setenv("LOWRANK_CL_DATA", "/data")
    monkeypatch.setenv("LOWRANK_CL_WEIGHTS", "/weights")
    for name in ("q1", "q2"):
        proto = load_protocol(name)
        selection, runs = plan(proto, quick=False, seeds=proto["seeds"], out=__import__("pathlib").Path("/o"))
        rows = {r["name"] for r in proto["rows"]}
        assert {"naive", "ewc", "lwf", "replay", "ncm", "linear_probe", "joint"} <= rows
        assert {"merge_lora", "codyra", "eblora", "inflora", "sd_lora", "o_lora", "hide_lora"} <= rows
        assert all("validation" in o for *_, o, _ in selection) and not any("validation" in o for *_, o, _ in runs)
        assert all(o["seed"] == proto["selection"]["seed"] for *_, o, _ in selection)
        assert {o["seed"] for *_, o, _ in runs} == set(proto["seeds"])
        args = _cli(runs[0][4])
        assert "--class-incremental" in args or "--task-incremental" in args
        assert not any("$" in a for a in args)  # environment expanded
    monkeypatch.delenv("LOWRANK_CL_DATA")
    with pytest.raises(ValueError, match=r"needs \$LOWRANK_CL_DATA"):
        load_protocol("q2")
    with pytest.raises(ValueError, match="No protocol 'q9'"):
        load_protocol("q9")


def test_cifar_validation_is_held_out_of_training(tmp_path):
    """The same for Split CIFAR (arrays source): validation images come from the training set, never trained on."""
    from experiments.benchmarks import split_cifar10

    y = np.repeat(np.arange(10), 12)
    x = np.zeros((len(y), 32, 32, 3), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(len(y)) // 256, np.arange(len(y)) % 256
    np.savez(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x[:20] + 1, y_test=y[:20])
    bm = split_cifar10(5, seed=0, data=tmp_path / "c.npz", validation=4, normalization=((0, 0, 0), (1, 1, 1)))

    def ids(ds):
        return [int(round(float(ds[i][0][0, 0, 0]) * 255)) * 256 + int(round(float(ds[i][0][1, 0, 0]) * 255))
                for i in range(len(ds))]

    val = [i for e in bm.test_stream for i in ids(e.dataset.eval())]
    train = [i for e in bm.train_stream for i in ids(e.dataset.eval())]
    assert len(val) == 20 and len(train) == 100 and not set(val) & set(train)
    assert sorted(set(val) | set(train)) == list(range(len(y)))


def test_suite_reruns_a_finished_run_of_another_protocol(tmp_path, monkeypatch):
    """A finished run whose recorded config differs from what the protocol now asks (e.g. fewer images) is moved
    aside and run again; one that matches is skipped."""
    import json

    from experiments import suite

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    cfg = dict(method="naive", subset=1000, lr=0.01, task_incremental=True, betas=[0.9, 0.999])
    (run_dir / "results.json").write_text(json.dumps(dict(config=cfg, finished=True, A_last=0.5)))
    opts = dict(method="naive", subset=1000, lr=0.01, scenario="task_il", betas=[0.9, 0.999])
    assert suite.run_one(opts, run_dir, threads=1)[1] == "done before"
    calls = []
    monkeypatch.setattr(suite, "_execute", lambda cmd, log, env, inp: (calls.append(cmd), (0, ""))[1])
    for changed in (dict(opts, subset=500), dict(opts, scenario="class_il"), dict(opts, lr=0.003)):
        suite.run_one(changed, run_dir, threads=1)
    assert len(calls) == 3 and len(list(tmp_path.glob("r.stale-*"))) >= 1


def test_suite_records_let_a_fresh_clone_skip_finished_runs(tmp_path, monkeypatch):
    """A finished run is recorded compactly (heavy per-module fields left out); in a fresh output folder (a new
    clone, no run folders) the record is found and the run skipped, a run of another config is not, and the
    tables aggregate from records alone."""
    import json
    from pathlib import Path

    from experiments import suite

    cfg = dict(method="naive", lr=0.01, task_incremental=True)
    full = dict(config=cfg, finished=True, A_last=0.75, A_avg=0.8, average_forgetting=0.1, bwt=-0.1,
                accuracy_matrix=[[0.9, None], [0.7, 0.8]], average_accuracy=[0.9, 0.75], parameters=[],
                training=dict(lr=0.01), spectra={"layer": list(range(5000))}, rank_usage={"x": 1})
    opts = dict(method="naive", lr=0.01, scenario="task_il")

    def fake_run(cmd, log, env, in_process):
        out = Path(cmd[cmd.index("--out") + 1])
        (out / "results.json").write_text(json.dumps(full))
        return 0, ""

    calls = []
    monkeypatch.setattr(suite, "_execute", lambda *a: (calls.append(a[0]), fake_run(*a))[1])
    rec = suite.Records(tmp_path / "out1", tmp_path / "published")
    run_dir = tmp_path / "out1" / "runs" / "task_il" / "naive" / "seed0"
    assert suite.run_one(opts, run_dir, threads=1, records=rec)[1] == "ran"
    record = tmp_path / "published" / "records" / "runs" / "task_il" / "naive" / "seed0.json"
    kept = json.loads(record.read_text())
    assert "spectra" not in kept and "rank_usage" not in kept and kept["A_last"] == 0.75
    assert record.stat().st_size < 2000
    # a fresh clone: another output folder, no run folders, the same records
    rec2 = suite.Records(tmp_path / "out2", tmp_path / "published")
    run_dir2 = tmp_path / "out2" / "runs" / "task_il" / "naive" / "seed0"
    assert suite.run_one(opts, run_dir2, threads=1, records=rec2)[1] == "done before"
    assert len(calls) == 1 and not run_dir2.exists()
    row = dict(name="naive", method="naive")
    table = suite.aggregate({}, [(row, "task_il", 0, None, opts, run_dir2)], rec2)
    assert table["task_il"]["naive"]["A_last"] == [0.75]
    # a record of another configuration is neither skipped nor aggregated
    other = dict(opts, lr=0.003)
    assert suite.aggregate({}, [(row, "task_il", 0, None, other, run_dir2)], rec2)["task_il"]["naive"]["A_last"] == []
    assert suite.run_one(other, run_dir2, threads=1, records=rec2)[1] == "ran" and len(calls) == 2
    # a run folder finished before records were kept gets its record when the suite passes over it
    record.unlink()
    assert suite.run_one(opts, run_dir, threads=1, records=rec)[1] == "done before" and record.is_file()


def test_suite_table_gives_the_rate_the_optimizer_used_when_the_recipe_scales_it(tmp_path):
    """HiDe-LoRA's recipe scales the lr by batch / 256: the table shows the chosen lr (as the CLI and the protocol's
    selection take it) and the rate the optimizer used; a recipe without scaling shows one number."""
    from experiments import suite

    rec = suite.Records(tmp_path / "out", tmp_path / "published")
    runs = []
    for name, training in (("hide_lora", dict(lr=0.03, effective_lr=0.03 * 32 / 256)), ("naive", dict(lr=0.01))):
        run_dir = tmp_path / "out" / "runs" / "task_il" / name / "seed0"
        rec.save(run_dir, dict(config=dict(method=name, task_incremental=True), finished=True, A_last=0.5, A_avg=0.5,
                               average_forgetting=0.0, bwt=0.0, accuracy_matrix=[[0.5]], average_accuracy=[0.5],
                               parameters=[], training=training))
        runs.append((dict(name=name, method=name), "task_il", 0, None, dict(method=name, scenario="task_il"), run_dir))
    table = suite.aggregate({}, runs, rec)
    cells = {r[1]: r[2] for r in suite._table_rows({}, table["task_il"])}
    assert cells == {"hide_lora": "0.03 (used: 0.00375)", "naive": "0.01"}


def test_suite_report_rebuilds_tables_from_records_without_running(tmp_path, monkeypatch):
    """``--report`` writes the tables, claims and figures from the recorded runs and runs nothing."""
    import csv

    from experiments import suite

    monkeypatch.setenv("LOWRANK_CL_DATA", str(tmp_path))
    monkeypatch.setenv("LOWRANK_CL_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(suite, "_execute", lambda *a: (_ for _ in ()).throw(AssertionError("ran a run")))
    proto = suite.load_protocol("q2")
    out, published = tmp_path / "out", tmp_path / "published"
    _, runs = suite.plan(proto, quick=False, seeds=[0], out=out)
    rec = suite.Records(out, published)
    for row, scenario, seed, _, opts, run_dir in suite._apply_selection(proto, runs):
        if row["name"] not in ("naive", "joint"):
            continue
        cfg = {k: v for k, v in opts.items() if k != "scenario"}
        cfg["task_incremental"] = scenario == "task_il"
        acc = 0.9 if row["name"] == "joint" else 0.6 if scenario == "task_il" else 0.105  # class-IL chance: 0.1
        bench = dict(scenario="task-incremental" if scenario == "task_il" else "class-incremental",
                     classes_per_experience=[[2 * i, 2 * i + 1] for i in range(5)])
        rec.save(run_dir, dict(config=cfg, finished=True, A_last=acc, A_avg=acc, average_forgetting=0.1, bwt=-0.1,
                               benchmark=bench,
                               accuracy_matrix=[[acc]], average_accuracy=[acc] * 5, parameters=[],
                               training=dict(lr=opts.get("lr", 0.01)), wall_time_s=1800.0))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- suite:q2 -->\nSTALE-BLOCK\n<!-- /suite:q2 -->\nafter\n")
    args = ["--protocol", "q2", "--seeds", "0", "--out", str(out), "--records", str(published), "--report"]
    assert suite.main(args + ["--readme", str(readme)]) == 0
    with open(published / "table_task_il.csv") as f:
        table = {r["method"]: r for r in csv.DictReader(f) if r["seeds"] == "1"}
    assert set(table) == {"naive", "joint"} and table["naive"]["last ÷ joint"] == "0.67"
    assert table["naive"]["last acc %"] == "60.0"  # task-IL chance is 50 %
    with open(published / "table_class_il.csv") as f:
        cil = {r["method"]: r for r in csv.DictReader(f) if r["seeds"] == "1"}
    assert cil["naive"]["last acc %"] == "10.5 (1/1 at chance)" and cil["joint"]["last acc %"] == "90.0"
    assert (published / "claims.md").is_file() and (published / "curves_task_il.png").stat().st_size > 10_000
    # the README block: replaced, with both tables, the claims, the figures and the wall time of the 4 runs (2 h)
    text = readme.read_text()
    assert text.startswith("# x\n<!-- suite:q2 -->\n####") and text.endswith("<!-- /suite:q2 -->\nafter\n")
    assert "STALE-BLOCK" not in text and "own time summed: 2.0 h" in text
    assert text.count("| fine-tuning (naive) | naive |") == 2 and "| claim (source) |" in text
    assert "](published/curves_task_il.png)" in text and "4 of " in text
    readme.write_text("# no block\n")
    assert suite.main(args + ["--readme", str(readme)]) == 2  # refused before anything is written


def test_suite_selection_of_a_new_row_keeps_the_rows_chosen_before(tmp_path):
    import yaml

    from experiments.suite import MARKER, _write_selection

    path = tmp_path / "p.yaml"
    path.write_text("protocol: p\n\n" + MARKER + "\nselected:\n  a: {lr: 0.1, validation_accuracy: 0.5}\n")
    (tmp_path / "selection.md").write_text("| row | grid point | validation last acc % |\n|---|---|---|\n"
                                           "| a | lr0.1 **chosen** | 50.0 |\n")
    proto = dict(path=str(path), rows=[{"name": "a"}, {"name": "b"}],
                 selected={"a": {"lr": 0.1, "validation_accuracy": 0.5}})
    _write_selection(proto, {"b": [({"lr": 0.01}, 0.7), ({"lr": 0.03}, None)]}, [tmp_path], write_back=True)
    assert yaml.safe_load(path.read_text())["selected"] == {"a": {"lr": 0.1, "validation_accuracy": 0.5},
                                                            "b": {"lr": 0.01, "validation_accuracy": 0.7}}
    assert (tmp_path / "selection.md").read_text().splitlines()[2:] == [
        "| a | lr0.1 **chosen** | 50.0 |", "| b | lr0.01 **chosen** | 70.0 |", "| b | lr0.03 | diverged |"]


def test_suite_claim_verdicts_on_hand_made_figures():
    from experiments.suite import claims

    def row(acc, stored=100, growth=None, ranks=None, r=8):
        res = dict(model=dict(lora=dict(r=r)), rank_history=ranks or [])
        return dict(A_last=[acc], stored=stored, growth_pct=growth, results=[res])

    table = {"class_il": {"a": row(0.6), "b": row(0.2), "c": row(0.3)},
             "task_il": {"small": row(0.875, 150, 33.0), "big": row(0.88, 900, 300.0), "worse": row(0.80, 120, 10.0),
                         "pruned": row(0.9, ranks=[{"x": 4, "y": 6}], r=16), "full": row(0.9, ranks=[{"x": 16}], r=16),
                         "lora": row(0.9, r=8)}}
    proto = dict(path="p.yaml", claims=[
        dict(kind="ranking", text="t", scenario="class_il", order=["a", "b", "c"]),
        dict(kind="ranking", text="t", scenario="class_il", order=["a", "c", "b"]),
        dict(kind="growth", text="t", row="small", baseline="big"),
        dict(kind="growth", text="t", row="worse", baseline="big"),
        dict(kind="fewer_ranks", text="t", row="pruned", baseline="lora"),
        dict(kind="fewer_ranks", text="t", row="full", baseline="lora")])
    out = claims(proto, table)
    assert [c["verdict"] for c in out] == ["does not hold", "holds", "holds", "does not hold", "holds",
                                           "does not hold"]
    assert out[0]["figures"] == "a 60.0 ≥ b 20.0 < c 30.0"  # where the order breaks, shown as measured
    assert out[2]["figures"] == "small 87.5 % at 0.1 k stored (+33 %); big 88.0 % at 0.9 k stored (+300 %)"
    assert out[4]["figures"].startswith("pruned: 5.0 ranks kept per layer and task on average (min 4, of r = 16)")


def test_suite_per_scenario_selection_plans_keys_and_applies_them(tmp_path, monkeypatch):
    import yaml

    from experiments import suite

    monkeypatch.setenv("LOWRANK_CL_DATA", str(tmp_path))
    monkeypatch.setenv("LOWRANK_CL_WEIGHTS", str(tmp_path))
    proto = suite.load_protocol("q2")
    proto["selection"] = dict(proto["selection"], per_scenario=["class_il"])
    selection, runs = suite.plan(proto, quick=False, seeds=[0], out=tmp_path)
    keys = {(s[0]["key"], s[1]) for s in selection}
    assert ("replay", "task_il") in keys and ("replay@class_il", "class_il") in keys
    assert ("hide_lora", "class_il") in keys and not any(k.startswith("hide_lora@") for k, _ in keys)  # class-IL only
    assert not any(k.startswith(("growing@", "mlora_")) for k, _ in keys if "@" in k)  # task-IL only rows
    proto["selected"] = {"replay": {"lr": 0.01}, "replay@class_il": {"lr": 0.001}}
    lr = {(r[0]["name"], r[1]): r[4]["lr"] for r in suite._apply_selection(proto, runs) if r[0]["name"] == "replay"}
    assert lr == {("replay", "task_il"): 0.01, ("replay", "class_il"): 0.001}
    # a choice written to the file by another suite process meanwhile is kept
    path = tmp_path / "p.yaml"
    path.write_text("protocol: p\n\n" + suite.MARKER + "\nselected:\n  naive@class_il: {lr: 0.1}\n")
    p = dict(path=str(path), rows=[{"name": "naive"}, {"name": "replay"}], selected={"replay": {"lr": 0.01}})
    suite._write_selection(p, {"replay@class_il": [({"lr": 0.001}, 0.6)]}, [tmp_path], write_back=True)
    assert list(yaml.safe_load(path.read_text())["selected"]) == ["naive@class_il", "replay", "replay@class_il"]
