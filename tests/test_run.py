"""experiments.run: configs, a real-data merge-LoRA run with a complete results.json, task-IL, naive, bad input."""

import json

import pytest
from conftest import (HAND_COUNTED_METHODS, assert_learned, backbone_shapes, calibrated_resnet20, expected_parameters,
                      made_data)

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
    assert_learned(res, 0.3)  # class-IL: chance 1/5 after experience 0, 1/10 after experience 1
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
    # merged: the fresh adapters are training state, serving needs the ResNet-32 and its head only
    assert p["adapter"] == sum(n for _, n in backbone_shapes("cifar_resnet32", 4)["layers"].values())
    assert [(q["stored"], q["inference"]) for q in res["parameters"]] == expected_parameters(res, "cifar_resnet32", 4)
    assert len(res["train_time_s"]) == 2 and res["wall_time_s"] > 0
    assert "accuracy matrix" in stdout
    assert (out / "log.txt").stat().st_size > 0 and (out / "csv" / "eval_results.csv").is_file()


def _made_data(tmp_path, n_classes=4):
    """10 made images per class, the class planted in two channels (conftest.made_data); test = train."""
    return made_data(tmp_path / "made.npz", n_classes, 10)


# How the made-data ResNet runs train so that every experience is learnt (asserted) in a few seconds: a random
# ResNet-20 calibrated on the data and given as weights (frozen BatchNorm: training and evaluation compute the same
# function, see conftest.calibrated_resnet20), SGD with momentum (AdamW's steps of about lr per weight move a fresh
# head too slowly in 30 steps), LoRA scale 0.25 (alpha 0.5 at r 2: larger adapters blow up the features that a frozen
# BatchNorm no longer renormalises), batch 4 and 6 epochs, i.e. 30 steps per experience (4 epochs left some
# experiences at chance on some seeds).
_LEARN = ["--batch-size", "4", "--epochs", "6", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01"]
# margins over chance: task-IL (two classes per task, chance 0.5) every seed tried reached >= 0.95; class-IL (chance
# 1/2, then 1/4) the new experience's accuracy went down to 0.5 on some seeds (SD-LoRA, replay: old classes' rows
# still take part of the new classes), an untrained model stays at chance on experience 0
_TIL, _CIL = 0.3, 0.2
_LORA = ["--r", "2", "--alpha", "0.5"]
# the fine-tuning baselines train every weight: a smaller step keeps the frozen-BatchNorm ResNet finite (lr 0.003
# diverged to a NaN loss or collapsed to one class on some seeds); the linear probe trains its head alone at 0.01
_FULL = ["--lr", "0.001"]


def _resnet_args(tmp_path, method, *extra, task_il=False):
    data = _made_data(tmp_path)
    weights = calibrated_resnet20(data, tmp_path / "calibrated.pt")
    return ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--method", method, "--backbone",
            "cifar_resnet20", "--backbone-weights", str(weights), *_LEARN, *extra,
            *(["--task-incremental"] if task_il else [])]


def _counts(res):
    return [(p["stored"], p["inference"]) for p in res["parameters"]]


def test_hand_counts_of_the_backbones():
    """The shapes the parameter checks start from, against the architectures written out: ResNet-20 (He et al.,
    option-A shortcuts: no parameters) and the CLI's ViT (timm, patch 4, width 192, depth 12, MLP 768)."""
    def conv(i, o):
        return 9 * i * o

    def stage(i, o, n=3):  # n basic blocks, the first one i -> o: two 3x3 convs and two BatchNorms each
        return conv(i, o) + conv(o, o) + 4 * o + (n - 1) * (2 * conv(o, o) + 4 * o)

    def lora(i, o):  # r = 2: A (2, i, 3, 3), B (o, 2, 1, 1)
        return 2 * 9 * i + 2 * o

    r20 = backbone_shapes("cifar_resnet20", 2)
    assert r20["body"] == conv(3, 16) + 2 * 16 + stage(16, 16) + stage(16, 32) + stage(32, 64) == 269072
    assert r20["last_stage"] == stage(32, 64)
    assert r20["features"] == 64 and len(r20["layers"]) == 18 and r20["bn"] == 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    assert sum(n for _, n in r20["layers"].values()) == \
        6 * lora(16, 16) + lora(16, 32) + 5 * lora(32, 32) + lora(32, 64) + 5 * lora(64, 64) == 12576
    d, h = 192, 768
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)  # norms, qkv, proj, fc1, fc2
    vit = backbone_shapes("vit_cifar", 2)
    assert vit["body"] == (3 * 4 * 4 * d + d) + d + 65 * d + 12 * block + 2 * d  # patches, cls, positions, norm
    assert vit["features"] == d and len(vit["layers"]) == 48
    assert sum(n for _, n in vit["layers"].values()) == 12 * 2 * ((d + 3 * d) + (d + d) + (d + h) + (h + d))


def test_every_registry_method_has_a_hand_count():
    from strategies.registry import method_registry

    assert sorted(method_registry()) == sorted(HAND_COUNTED_METHODS)


def test_task_incremental_merge_lora_and_naive(tmp_path, capsys):
    for method in ("merge_lora", "naive"):
        extra = _LORA if method == "merge_lora" else _FULL
        res, _, _ = _run(tmp_path, capsys, *_resnet_args(tmp_path, method, *extra, task_il=True))
        assert res["benchmark"]["scenario"] == "task-incremental"
        m = res["accuracy_matrix"]  # trained tasks only: a task without a trained head cannot be evaluated
        assert m[0][1] is None and None not in (m[0][0], m[1][0], m[1][1])
        assert_learned(res, _TIL)  # two classes per task: chance 0.5
        # the backbone and one 64->2 head per task; a forward pass uses one head
        assert _counts(res) == expected_parameters(res, "cifar_resnet20", 2) == \
            [(269072 + 130, 269072 + 130), (269072 + 260, 269072 + 130)]
        if method == "merge_lora":
            assert all(n.startswith("backbone.") for n in res["model"]["lora"]["adapted_modules"])
            assert res["parameters"][-1]["adapter"] == 12576  # the fresh adapters, not counted as stored
        else:
            assert res["model"]["lora"] is None and res["parameters"][-1]["adapter"] == 0


def test_vit_backbone_runs(tmp_path, capsys):
    data = _made_data(tmp_path)
    cfg = tmp_path / "vit.yaml"
    cfg.write_text("backbone: vit_cifar\nbenchmark: arrays\nn_experiences: 2\nbatch_size: 8\n")
    # vit_cifar's default depth is 12; the CLI run keeps it, so this also checks the auto targets on a real ViT
    res, _, _ = _run(tmp_path, capsys, "--config", str(cfg), "--data", str(data), "--r", "2")
    assert len(res["model"]["lora"]["adapted_modules"]) == 48
    assert_learned(res, _CIL)  # class-IL over 2, then 4 classes
    assert _counts(res) == expected_parameters(res, "vit_cifar", 2)
    assert res["parameters"][-1]["adapter"] == sum(n for _, n in backbone_shapes("vit_cifar", 2)["layers"].values())


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


def test_nan_loss_in_a_later_experience_stops_there_and_keeps_the_finished_one(tmp_path, capsys, monkeypatch):
    """The loss turns NaN on the first mini-batch of experience 1 (a criterion poisoned on its classes, as a diverging
    run would): the run stops there with exit code 3, and results.json keeps experience 0, learnt, with its figures."""
    import torch

    from experiments.run import build_benchmark

    args = _resnet_args(tmp_path, "merge_lora", *_LORA) + ["--out", str(tmp_path / "nan"), "--no-progress"]
    poisoned = sorted(int(c) for c in build_benchmark(parse_config(args)).original_classes_in_exp[1])

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            loss = super().forward(logits, target)
            if torch.is_grad_enabled() and torch.isin(target, torch.tensor(poisoned)).any():
                return loss * float("nan")  # training on experience 1's classes (evaluation runs without gradients)
            return loss

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", PoisonedLoss)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 3 and "training loss is nan at experience 1, epoch 0, iteration 0" in err
    res = json.loads((tmp_path / "nan" / "results.json").read_text())
    assert not res["finished"] and res["experiences_done"] == 1
    assert {k: res["stopped"][k] for k in ("experience", "epoch", "iteration")} == dict(experience=1, epoch=0,
                                                                                          iteration=0)
    assert res["benchmark"]["classes_per_experience"][1] == poisoned
    m = res["accuracy_matrix"]
    assert len(m) == 1 and m[0][1] is None
    assert_learned(res, _CIL)  # experience 0's accuracy is kept, and it was learnt
    assert res["average_accuracy"] == [m[0][0]] and res["final_average_accuracy"] == m[0][0]
    assert len(res["parameters"]) == len(res["train_time_s"]) == 1 and res["train_iterations"] == [5 * 6]
    ck = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ck["experience"] == 0 and ck["results"]["accuracy_matrix"] == m


@pytest.mark.parametrize("method", ["per_task_lora", "codyra", "eblora"])
@pytest.mark.parametrize("task_il", [False, True], ids=["class-il", "task-il"])
def test_every_method_runs_from_the_cli(tmp_path, capsys, method, task_il):
    res, _, _ = _run(tmp_path, capsys, *_resnet_args(tmp_path, method, *_LORA, task_il=task_il))
    assert res["finished"] and len(res["accuracy_matrix"]) == 2
    assert_learned(res, _TIL if task_il else _CIL)
    assert _counts(res) == expected_parameters(res, "cifar_resnet20", 2)
    if method == "codyra":
        assert len(res["rank_history"]) == 2
    if method == "eblora":
        assert all(k > 0 for k in res["subspace_history"][0].values())
    assert res["train_step_time_s"] > 0


def test_per_task_class_il_with_eval_on_all_measures_before_training(tmp_path, capsys):
    res, _, _ = _run(tmp_path, capsys, *_resnet_args(tmp_path, "per_task_lora", *_LORA), "--eval-on", "all")
    m, init = res["accuracy_matrix"], res["initial_accuracy"]
    assert len(init) == 2 and None not in init and all(v is not None for row in m for v in row)
    assert res["forward_transfer"] == pytest.approx(m[0][1] - init[1])  # R[i-1][i] - b[i] over i >= 1
    assert_learned(res, _CIL)
    assert _counts(res) == expected_parameters(res, "cifar_resnet20", 2)


@pytest.mark.parametrize("name", ["default", "merge_lora", "naive", "per_task_lora", "growing", "codyra", "eblora",
                                  "inflora", "sd_lora", "o_lora", "hide_lora"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    from experiments.run import METHODS

    cfg = parse_config(["--config", str(Path(__file__).parents[1] / "experiments" / "configs" / f"{name}.yaml")])
    assert cfg["method"] in METHODS and cfg["method"] == (name if name != "default" else "merge_lora")


def _peer_args(tmp_path, method, backbone):
    if backbone == "cifar_resnet20":  # hide_lora scales its lr by batch / 256: 0.64 is 0.01 at batch 4
        return _resnet_args(tmp_path, method, *_LORA, *(["--lr", "0.64"] if method == "hide_lora" else []))
    data = _made_data(tmp_path)
    # the ViT (LayerNorm, no weights needed): InfLoRA learns in one epoch of its recipe (its covariance passes make
    # each epoch slow), HiDe-LoRA in two; SD-LoRA and O-LoRA (scale 16 at r 2 by default) in two of SGD at scale 0.25
    train = {"inflora": [], "hide_lora": ["--epochs", "2"]}.get(
        method, ["--epochs", "2", "--optimizer", "sgd", "--momentum", "0.9", "--alpha", "0.5"])
    return ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--method", method, "--backbone",
            backbone, "--batch-size", "8", "--r", "2", "--lr", "0.01", *train]


def _hide_tii_by_hand(res, args, out):
    """Task-identity accuracy of each trained experience recomputed from the checkpoint: the task of the shared
    model's most likely seen class, against the experience's own task. Checks first that the shared model's LoRA
    trained (its B factors start at zero; classifier alignment alone would train its head)."""
    import torch

    from experiments.run import build_benchmark, build_model
    from models import add_lora, default_normalization, parse_normalization

    cfg = parse_config(args + ["--out", str(out)])
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    sizes = [len(c) for c in res["benchmark"]["classes_per_experience"]]
    lora_b = [v for k, v in ck["plugin"]["shared_model"].items() if k.endswith("lora_B")]
    assert lora_b and all(bool(v.abs().sum() > 0) for v in lora_b), "the task-shared model's LoRA did not train"
    shared = build_model(cfg, sum(sizes), sizes[0])
    add_lora(shared, "auto", r=cfg["r"], alpha=cfg["alpha"])
    shared.load_state_dict(ck["plugin"]["shared_model"])
    shared.eval()
    bm = build_benchmark(cfg, parse_normalization(cfg["normalization"])
                         or default_normalization(cfg["backbone"], cfg["backbone_weights"] is not None))
    task_of = {c: t for t, cs in enumerate(res["benchmark"]["classes_per_experience"]) for c in cs}
    seen = torch.tensor(sorted(task_of))
    tii = []
    for t, exp in enumerate(bm.test_stream):
        data = exp.dataset.eval()
        x = torch.stack([data[i][0] for i in range(len(data))])
        with torch.no_grad():
            cls = seen[shared(x)[:, seen].argmax(1)]
        tii.append(sum(task_of[int(c)] == t for c in cls) / len(cls))
    return tii


@pytest.mark.parametrize("method", ["inflora", "sd_lora", "o_lora", "hide_lora"])
@pytest.mark.parametrize("backbone", ["cifar_resnet20", "vit_cifar"])
def test_peer_methods_run_class_incremental_from_the_cli(tmp_path, capsys, method, backbone):
    # classifier alignment long enough that the shared model infers the task (2 epochs left it near chance)
    hide = ["--ca-epochs", "10", "--ca-lr", "0.05", "--n-centroids", "2"] if method == "hide_lora" else []
    args = _peer_args(tmp_path, method, backbone) + hide
    res, out, stdout = _run(tmp_path, capsys, *args)
    assert res["finished"] and len(res["accuracy_matrix"]) == 2
    assert_learned(res, _CIL)
    assert _counts(res) == expected_parameters(res, backbone, 2, n_centroids=2)
    if method == "hide_lora":
        tii = res["tii_accuracy"]
        assert len(tii) == 2 and tii[1] == pytest.approx(_hide_tii_by_hand(res, args, out))
        assert sum(tii[1]) / 2 > 0.5 + 0.2  # two tasks: chance 0.5
        assert "task-identity inference accuracy" in stdout
    else:
        assert "tii_accuracy" not in res
    if method == "inflora":
        assert [h["threshold"] for h in res["subspace_history"]] == pytest.approx([0.95, 0.975])
    if method == "o_lora":
        assert len(res["orth_loss_history"]) == 2


@pytest.mark.parametrize("method", ["inflora", "sd_lora", "o_lora"])
def test_peer_methods_run_task_incremental(tmp_path, capsys, method):
    res, _, _ = _run(tmp_path, capsys, *_resnet_args(tmp_path, method, *_LORA, task_il=True))
    assert res["finished"] and res["benchmark"]["scenario"] == "task-incremental"
    assert_learned(res, _TIL)
    assert _counts(res) == expected_parameters(res, "cifar_resnet20", 2)


@pytest.mark.parametrize("method", ["ewc", "lwf", "replay", "ncm", "linear_probe", "joint"])
@pytest.mark.parametrize("task_il", [False, True], ids=["class-il", "task-il"])
def test_baselines_learn_and_store_what_their_definition_says(tmp_path, capsys, method, task_il):
    res, _, _ = _run(tmp_path, capsys, *_resnet_args(tmp_path, method, *([] if method == "linear_probe" else _FULL),
                                                     task_il=task_il))
    assert res["finished"] and res["experiences_done"] == 2
    assert len(res["accuracy_matrix"]) == (1 if method == "joint" else 2)  # joint: one step on every experience
    assert_learned(res, _TIL if task_il else _CIL)
    assert _counts(res) == expected_parameters(res, "cifar_resnet20")


def test_growing_network_learns_without_forgetting_and_grows_one_stage_per_task(tmp_path, capsys):
    res, _, _ = _run(tmp_path, capsys, *_resnet_args(tmp_path, "growing", *_FULL, task_il=True))
    assert res["finished"] and res["model"]["grown_modules"] == [f"backbone.layer3.{i}" for i in range(3)]
    assert_learned(res, _TIL)
    m = res["accuracy_matrix"]
    assert m[1][0] == m[0][0] and res["average_forgetting"] == 0  # task 0's copy and head are frozen
    assert _counts(res) == expected_parameters(res, "cifar_resnet20")
    stage = backbone_shapes("cifar_resnet20", 1)["last_stage"]
    assert res["parameters"][-1]["growth_pct"] == pytest.approx(100 * 2 * stage / 269072, abs=0.2)  # + 2 heads


def test_growing_network_refuses_class_incremental(tmp_path, capsys):
    code = main(["--benchmark", "arrays", "--data", str(_made_data(tmp_path)), "--n-experiences", "2", "--method",
                 "growing", "--backbone", "cifar_resnet20", "--out", str(tmp_path / "o")])
    assert code == 2 and "use --task-incremental" in capsys.readouterr().err


def test_hide_lora_refuses_task_incremental(tmp_path, capsys):
    data = _made_data(tmp_path)
    code = main(["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--method", "hide_lora",
                 "--backbone", "cifar_resnet20", "--task-incremental", "--out", str(tmp_path / "o")])
    assert code == 2 and "drop --task-incremental" in capsys.readouterr().err


def test_hide_lora_on_real_cifar10(tmp_path, capsys, cifar10_npz, resnet32_weights):
    """The whole hierarchy on real images and the pretrained ResNet-32: task inference far above chance, and
    (below 1 here, unlike on made data) equal to a count by hand from the saved shared model."""
    args = ["--benchmark", "split_cifar10", "--n-experiences", "2", "--method", "hide_lora",
            "--backbone", "cifar_resnet32", "--backbone-weights", str(resnet32_weights), "--data", str(cifar10_npz),
            "--subset", "200", "--eval-subset", "100", "--batch-size", "32", "--lr", "0.05", "--seed", "0",
            "--ca-epochs", "5"]
    res, out, _ = _run(tmp_path, capsys, *args)
    m, tii = res["accuracy_matrix"], res["tii_accuracy"]
    assert m[0][0] > 0.5 and m[1][1] > 0.4 and m[1][0] > 0.3  # 5 classes per experience: chance 0.2
    assert sum(tii[1]) / 2 > 0.6  # two tasks: chance 0.5
    assert tii[1] == pytest.approx(_hide_tii_by_hand(res, args, out))
    assert_learned(res, 0.2)
    assert [(p["stored"], p["inference"]) for p in res["parameters"]] == \
        expected_parameters(res, "cifar_resnet32", 8, n_centroids=10)


def test_report_table_from_two_runs(tmp_path, capsys):
    from experiments.report import main as report_main

    dirs, results = [], []
    for method in ("merge_lora", "naive"):
        out = tmp_path / method
        assert main(_resnet_args(tmp_path, method, *(_LORA if method == "merge_lora" else _FULL))
                    + ["--out", str(out), "--no-progress"]) == 0
        dirs.append(out)
        results.append(json.loads((out / "results.json").read_text()))
        assert_learned(results[-1], _CIL)
    capsys.readouterr()
    assert report_main([str(d) for d in dirs] + ["--relative-to", str(dirs[0])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith("|---")
    ref_step = results[0]["train_step_time_s"]
    for line, res, d in zip(lines[2:], results, dirs):
        cells = [c.strip() for c in line.strip("|").split("|")]
        m, p = res["accuracy_matrix"], res["parameters"][-1]
        last = (m[1][0] + m[1][1]) / 2
        avg_inc = (m[0][0] + last) / 2
        forgetting = m[0][0] - m[1][0]
        step = res["train_step_time_s"]
        assert cells == [d.name, res["method"], "class-incremental", f"{100 * last:.1f}", f"{100 * avg_inc:.1f}",
                         f"{100 * forgetting:.1f}", f"{-100 * forgetting:.1f}", f"{p['inference']:,}",
                         f"{p['stored']:,}", f"{1000 * step:.1f}", f"{step / ref_step:.2f}"]
    assert report_main([str(tmp_path / "missing")]) == 2
