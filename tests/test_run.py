"""experiments.run: configs, a real-data merge-LoRA run with a complete results.json, task-IL, naive, bad input."""

import json

import numpy as np
import pytest

from experiments.run import DEFAULTS, main, parse_config, summarize


def test_config_file_then_cli_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("method: merge_lora\nr: 16\nlr: 0.5\nbatch-size: 8\n")
    cfg = parse_config(["--config", str(cfg_file), "--r", "2"])
    assert cfg["method"] == "merge_lora" and cfg["lr"] == 0.5 and cfg["batch_size"] == 8
    assert cfg["r"] == 2  # the command line wins
    assert cfg["epochs"] == DEFAULTS["epochs"]
    assert parse_config(["--benchmark", "split_cifar100"])["n_experiences"] == 10


@pytest.mark.parametrize(
    "text,match",
    [("methd: naive\n", "unknown option"), ("method: ewc_plus\n", "Unknown method 'ewc_plus'"),
     ("epochs: 0\n", "--epochs must be an integer >= 1"), ("benchmark: arrays\n", "needs --data"),
     ("task_incremental: true\neval_on: all\n", "cannot go with --task-incremental")],
)
def test_bad_config_values(tmp_path, text, match):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ValueError, match=match):
        parse_config(["--config", str(cfg_file)])


def test_unknown_cli_choice_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--method", "nope"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_summarize_against_hand_computed_values():
    m = [[0.9, None, None], [0.6, 0.8, None], [0.3, 0.5, 0.7]]
    s = summarize(m)
    assert s["average_accuracy"] == pytest.approx([0.9, 0.7, 0.5])
    assert s["forgetting_per_experience"] == pytest.approx([0.6, 0.3])
    assert s["average_forgetting"] == pytest.approx(0.45) and s["bwt"] == pytest.approx(-0.45)


def _run(tmp_path, capsys, *args):
    out = tmp_path / "run"
    code = main([*args, "--out", str(out), "--no-progress", "--threads", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads((out / "results.json").read_text()), out, captured.out


def test_merge_lora_two_experiences_on_real_cifar10(tmp_path, capsys, cifar10_npz, resnet32_weights):
    res, out, stdout = _run(
        tmp_path, capsys, "--benchmark", "split_cifar10", "--n-experiences", "2", "--method", "merge_lora",
        "--backbone", "cifar_resnet32", "--backbone-weights", str(resnet32_weights), "--data", str(cifar10_npz),
        "--subset", "300", "--eval-subset", "200", "--batch-size", "32", "--seed", "3", "--r", "4",
        "--alpha", "1", "--optimizer", "sgd", "--lr", "0.05", "--lr-schedule", "constant", "--warmup", "0",
    )
    assert res["finished"] and res["experiences_done"] == 2
    m = res["accuracy_matrix"]
    assert len(m) == 2 and m[0][1] is None and None not in (m[0][0], m[1][0], m[1][1])
    # a pretrained backbone with a fresh head learns each 5-class experience far above chance (0.2)
    assert m[0][0] > 0.5 and m[1][1] > 0.5
    assert res["final_average_accuracy"] == pytest.approx((m[1][0] + m[1][1]) / 2)
    assert res["average_forgetting"] == pytest.approx(m[0][0] - m[1][0])
    assert res["avalanche"]["StreamForgetting/eval_phase/test_stream"] == pytest.approx(res["average_forgetting"])
    b = res["benchmark"]
    assert b["seed"] == 3 and sorted(b["class_order"]) == list(range(10)) and b["train_sizes"] == [300, 300]
    assert sorted(b["classes_per_experience"][0] + b["classes_per_experience"][1]) == list(range(10))
    lora = res["model"]["lora"]
    assert lora["r"] == 4 and lora["alpha"] == 1 and lora["scaling"] == pytest.approx(0.25)
    assert len(lora["adapted_modules"]) == 30 and res["model"]["bn"] == "frozen"
    p = res["parameters"][-1]
    assert p["adapter"] > 0 and p["trainable"] == p["adapter"] + 650  # adapters + the 64->10 head
    assert len(res["train_time_s"]) == 2 and res["wall_time_s"] > 0
    assert "accuracy matrix" in stdout
    assert (out / "log.txt").stat().st_size > 0 and (out / "csv" / "eval_results.csv").is_file()


def _made_data(tmp_path, n_classes=4):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes), 10)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    x[..., 1] = (y * 60)[:, None, None]
    path = tmp_path / "made.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    return path


def test_task_incremental_merge_lora_and_naive(tmp_path, capsys):
    data = _made_data(tmp_path)
    for method in ("merge_lora", "naive"):
        res, _, _ = _run(
            tmp_path, capsys, "--benchmark", "arrays", "--data", str(data), "--n-experiences", "2",
            "--task-incremental", "--method", method, "--backbone", "cifar_resnet20", "--batch-size", "8",
        )
        assert res["benchmark"]["scenario"] == "task-incremental"
        m = res["accuracy_matrix"]  # trained tasks only: a task without a trained head cannot be evaluated
        assert m[0][1] is None and None not in (m[0][0], m[1][0], m[1][1])
        if method == "merge_lora":
            assert all(n.startswith("backbone.") for n in res["model"]["lora"]["adapted_modules"])
        else:
            assert res["model"]["lora"] is None and res["parameters"][-1]["adapter"] == 0


def test_vit_backbone_runs(tmp_path, capsys):
    data = _made_data(tmp_path)
    cfg = tmp_path / "vit.yaml"
    cfg.write_text("backbone: vit_cifar\nbenchmark: arrays\nn_experiences: 2\nbatch_size: 8\n")
    # vit_cifar's default depth is 12; the CLI run keeps it, so this also checks the auto targets on a real ViT
    res, _, _ = _run(tmp_path, capsys, "--config", str(cfg), "--data", str(data), "--r", "2")
    assert len(res["model"]["lora"]["adapted_modules"]) == 48


@pytest.mark.parametrize(
    "args,match",
    [
        (["--backbone", "resnet9000"], "Unknown backbone"),
        (["--target-modules", "nothing_here"], "matched no nn.Linear"),
        (["--r", "0"], "--r must be an integer >= 1"),
        (["--alpha", "-1"], "--alpha must be > 0"),
        (["--n-experiences", "3"], "does not split the 4 classes"),
        (["--device", "cuda:0"], "CUDA is not available"),
        (["--backbone-weights", "/no/such/file.th"], "not found"),
    ],
)
def test_bad_input_fails_fast_with_message(tmp_path, capsys, args, match):
    import torch

    if args[:1] == ["--device"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda:0 is valid here")
    data = _made_data(tmp_path)
    code = main(["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--backbone",
                 "cifar_resnet20", "--out", str(tmp_path / "o"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert match in err


def test_nan_loss_stops_with_experience_and_keeps_results(tmp_path, capsys):
    data = _made_data(tmp_path)
    out = tmp_path / "nan"
    code = main(["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--backbone",
                 "cifar_resnet20", "--lr", "1e30", "--out", str(out), "--no-progress", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 3 and "training loss is" in err and "experience" in err
    res = json.loads((out / "results.json").read_text())
    assert not res["finished"] and res["stopped"]["experience"] in (0, 1)
    assert res["experiences_done"] == res["stopped"]["experience"]


@pytest.mark.parametrize("method", ["per_task_lora", "codyra", "eblora"])
@pytest.mark.parametrize("task_il", [False, True], ids=["class-il", "task-il"])
def test_every_method_runs_from_the_cli(tmp_path, capsys, method, task_il):
    data = _made_data(tmp_path)
    res, _, _ = _run(
        tmp_path, capsys, "--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--method", method,
        "--backbone", "cifar_resnet20", "--batch-size", "8", "--r", "2", "--optimizer", "adamw", "--lr", "1e-3",
        *(["--task-incremental"] if task_il else []),
    )
    assert res["finished"] and len(res["accuracy_matrix"]) == 2
    p0, p1 = res["parameters"]
    assert p1["inference"] <= p1["stored"]
    if method == "per_task_lora":
        assert p1["stored"] > p0["stored"]  # one more adapter set (and head in task-IL)
    else:  # merged methods serve with the backbone alone (and, in task-IL, one of the two 64->2 heads)
        assert p1["inference"] == p1["total"] - p1["adapter"] - (64 * 2 + 2 if task_il else 0)
    if method == "codyra":
        assert len(res["rank_history"]) == 2
    if method == "eblora":
        assert all(k > 0 for k in res["subspace_history"][0].values())
    assert res["train_step_time_s"] > 0


def test_per_task_class_il_with_eval_on_all_measures_before_training(tmp_path, capsys):
    data = _made_data(tmp_path)
    res, _, _ = _run(tmp_path, capsys, "--benchmark", "arrays", "--data", str(data), "--n-experiences", "2",
                     "--method", "per_task_lora", "--backbone", "cifar_resnet20", "--batch-size", "8",
                     "--eval-on", "all")
    assert len(res["initial_accuracy"]) == 2 and res["forward_transfer"] is not None
    assert all(v is not None for row in res["accuracy_matrix"] for v in row)


@pytest.mark.parametrize("name", ["default", "merge_lora", "naive", "per_task_lora", "codyra", "eblora", "inflora",
                                  "sd_lora", "o_lora", "hide_lora"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    from experiments.run import METHODS

    cfg = parse_config(["--config", str(Path(__file__).parents[1] / "experiments" / "configs" / f"{name}.yaml")])
    assert cfg["method"] in METHODS and cfg["method"] == (name if name != "default" else "merge_lora")


@pytest.mark.parametrize("method", ["inflora", "sd_lora", "o_lora", "hide_lora"])
@pytest.mark.parametrize("backbone", ["cifar_resnet20", "vit_cifar"])
def test_peer_methods_run_class_incremental_from_the_cli(tmp_path, capsys, method, backbone):
    data = _made_data(tmp_path)
    hide = ["--ca-epochs", "2", "--n-centroids", "2"] if method == "hide_lora" else []
    res, _, stdout = _run(
        tmp_path, capsys, "--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--method", method,
        "--backbone", backbone, "--batch-size", "8", "--r", "2", "--lr", "0.01", *hide,
    )
    assert res["finished"] and len(res["accuracy_matrix"]) == 2
    p0, p1 = res["parameters"]
    assert p1["stored"] > p0["stored"], "each task adds its adapter (and, for hide_lora, statistics)"
    assert p1["inference"] <= p1["stored"]
    if method == "hide_lora":
        assert len(res["tii_accuracy"]) == 2 and res["tii_accuracy"][0][0] == 1.0  # one task: always right
        assert "task-identity inference accuracy" in stdout
    else:
        assert "tii_accuracy" not in res
    if method == "inflora":
        assert [h["threshold"] for h in res["subspace_history"]] == pytest.approx([0.95, 0.975])
    if method == "o_lora":
        assert len(res["orth_loss_history"]) == 2


@pytest.mark.parametrize("method", ["inflora", "sd_lora", "o_lora"])
def test_peer_methods_run_task_incremental(tmp_path, capsys, method):
    data = _made_data(tmp_path)
    res, _, _ = _run(tmp_path, capsys, "--benchmark", "arrays", "--data", str(data), "--n-experiences", "2",
                     "--method", method, "--backbone", "cifar_resnet20", "--batch-size", "8", "--r", "2",
                     "--task-incremental")
    assert res["finished"] and res["benchmark"]["scenario"] == "task-incremental"


def test_hide_lora_refuses_task_incremental(tmp_path, capsys):
    data = _made_data(tmp_path)
    code = main(["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--method", "hide_lora",
                 "--backbone", "cifar_resnet20", "--task-incremental", "--out", str(tmp_path / "o")])
    assert code == 2 and "drop --task-incremental" in capsys.readouterr().err


def test_hide_lora_on_real_cifar10(tmp_path, capsys, cifar10_npz, resnet32_weights):
    """The whole hierarchy on real images and the pretrained ResNet-32: task inference far above chance."""
    res, _, _ = _run(
        tmp_path, capsys, "--benchmark", "split_cifar10", "--n-experiences", "2", "--method", "hide_lora",
        "--backbone", "cifar_resnet32", "--backbone-weights", str(resnet32_weights), "--data", str(cifar10_npz),
        "--subset", "200", "--eval-subset", "100", "--batch-size", "32", "--lr", "0.05", "--seed", "0",
        "--ca-epochs", "5",
    )
    m, tii = res["accuracy_matrix"], res["tii_accuracy"]
    assert m[0][0] > 0.5 and m[1][1] > 0.4 and m[1][0] > 0.3  # 5 classes per experience: chance 0.2
    assert sum(tii[1]) / 2 > 0.6  # two tasks: chance 0.5


def test_report_table_from_two_runs(tmp_path, capsys):
    from experiments.report import main as report_main

    data = _made_data(tmp_path)
    dirs = []
    for method in ("merge_lora", "naive"):
        out = tmp_path / method
        assert main(["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--method", method,
                     "--backbone", "cifar_resnet20", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
        dirs.append(out)
    capsys.readouterr()
    assert report_main([str(d) for d in dirs] + ["--relative-to", str(dirs[0])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith("|---")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    res = json.loads((dirs[0] / "results.json").read_text())
    assert cells[1] == "merge_lora" and cells[-1] == "1.00"
    assert float(cells[3]) == pytest.approx(100 * res["final_average_accuracy"], abs=0.05)
    assert report_main([str(tmp_path / "missing")]) == 2
