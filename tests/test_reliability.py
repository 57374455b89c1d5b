"""Reliability: resume after SIGKILL gives the uninterrupted result, checkpoints are checked and loaded safely,
torchrun DDP keeps ranks identical and reports single-process numbers, bad input fails fast and clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_learned, calibrated_resnet20, expected_parameters, made_data

from experiments.run import evaluate_checkpoint, main, parse_config

ROOT = Path(__file__).resolve().parents[1]


def _made_data(tmp_path, n_classes=6, per_class=40):
    """Made images whose class is planted in two channels (conftest.made_data); every 4th one is the test set."""
    return made_data(tmp_path / "made.npz", n_classes, per_class, test_step=4)


def _learning(tmp_path, data, epochs):
    """Options under which the made-data runs learn every experience (see test_run._LEARN): the random ResNet-20
    calibrated on the data as weights (frozen BatchNorm), SGD with momentum (add _LORA for LoRA scale 0.25)."""
    return ["--backbone-weights", str(calibrated_resnet20(data, tmp_path / "calibrated.pt")), "--epochs", str(epochs),
            "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01"]


_LORA = ["--lora-r", "2", "--alpha", "0.5"]


def _counts(res):
    return [(p["stored"], p["inference"]) for p in res["parameters"]]


def _env(threads="1"):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None)
    return env


def _args(data, out, *extra):
    return ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "3", "--backbone", "cifar_resnet20",
            "--method", "per_task_lora", "--task-incremental", "--per-task-bn", "--batch-size", "8", "--epochs", "3",
            "--optimizer", "adam", "--lr", "1e-3", "--seed", "5", "--out", str(out), "--no-progress", *extra]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    data = _made_data(tmp_path)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.run"]
    subprocess.run(cmd + _args(data, ref_out, "--threads", "1"), env=_env(), check=True, cwd=ROOT,
                   capture_output=True)
    reference = json.loads((ref_out / "results.json").read_text())
    assert_learned(reference, 0.3)  # task-IL, two classes per task: chance 0.5
    # one adapter set (rank 8) and one copy of every BatchNorm per task; a forward pass uses its task's adapter and
    # BatchNorm copy (in place of the backbone's) and one 64->2 head
    # (stored only: the inference count includes the backbone's own BatchNorm as well, see test_metrics'
    # test_parameter_growth_per_task_batchnorm_inference)
    assert [s for s, _ in _counts(reference)] == \
        [s for s, _ in expected_parameters(reference, "cifar_resnet20", 8, per_task_bn=True)]

    proc = subprocess.Popen(cmd + _args(data, out, "--threads", "1"), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads((out / "results.json").read_text())["experiences_done"] >= 1:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    time.sleep(0.3)  # into the second experience's training
    assert proc.poll() is None, "the run ended before it could be killed; make the experiences longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads((out / "results.json").read_text())  # never half-written
    assert not partial["finished"] and 1 <= partial["experiences_done"] < 3
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["experience"] == partial["experiences_done"] - 1
    log_before = (out / "log.txt").read_text()

    assert main(_args(data, out, "--threads", "1", "--resume")) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["finished"] and resumed["resumed_at"] == [partial["experiences_done"]]
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]  # bit-identical floats
    assert [p["stored"] for p in resumed["parameters"]] == [p["stored"] for p in reference["parameters"]]
    # growth stays relative to the backbone before the first experience (not to the restored model with its banks)
    assert [p["growth_pct"] for p in resumed["parameters"]] == [p["growth_pct"] for p in reference["parameters"]]
    assert (out / "log.txt").read_text().startswith(log_before)  # the log was appended, not rewritten
    assert (out / "csv" / "eval_results.csv").is_file()
    assert (out / f"csv-resumed-at-{partial['experiences_done']}").is_dir()


def test_resume_refuses_other_run_corrupt_and_malicious_checkpoints(tmp_path, capsys):
    data = _made_data(tmp_path)
    out = tmp_path / "run"
    args = ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "3", "--backbone", "cifar_resnet20",
            "--batch-size", "16", "--out", str(out), "--no-progress", *_learning(tmp_path, data, 4)]
    assert main(args + _LORA + ["--resume"]) == 2
    assert "No checkpoint to resume from" in capsys.readouterr().err
    args_naive, args = args, args + _LORA  # naive has no LoRA options
    assert main(args) == 0
    capsys.readouterr()
    finished = json.loads((out / "results.json").read_text())
    assert_learned(finished, 0.2)  # class-IL: chance 1/2, 1/4, 1/6
    assert _counts(finished) == expected_parameters(finished, "cifar_resnet20", 2)
    assert main(args_naive + ["--resume", "--method", "naive"]) == 2
    err = capsys.readouterr().err
    assert "different run (" in err and "method: checkpoint 'merge_lora' vs now 'naive'" in err
    assert main(args + ["--resume", "--backbone", "cifar_resnet32"]) == 2
    assert "backbone: checkpoint 'cifar_resnet20'" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0  # a finished run resumes to itself

    good = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    assert main(args + ["--resume"]) == 2
    assert "corrupted" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))
    torch.save({"format": 1, "payload": Evil()}, out / "checkpoint.pt")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(args + ["--resume"]) == 2
    finally:
        os.chdir(cwd)
    assert "weights_only" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists()


def test_every_torch_load_is_weights_only():
    for path in list((ROOT / "models").glob("*.py")) + list((ROOT / "strategies").glob("*.py")) + \
            list((ROOT / "experiments").glob("*.py")):
        for line in path.read_text().splitlines():
            if "torch.load(" in line and not line.strip().startswith(("#", '"', "`")):
                assert "weights_only=True" in line, f"{path.name}: {line.strip()}"


def test_torchrun_ddp_two_processes_gloo(tmp_path):
    data = _made_data(tmp_path, n_classes=4, per_class=24)
    out = tmp_path / "ddp"
    run_args = ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--backbone",
                "cifar_resnet20", "--method", "merge_lora", "--task-incremental", "--batch-size", "8", *_LORA,
                "--seed", "3", "--out", str(out), "--no-progress", "--threads", "1", *_learning(tmp_path, data, 6)]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "experiments.run", *run_args], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["distributed"]["world_size"] == 2 and res["distributed"]["backend"] == "gloo"
    # checked after every experience (the check raises, and the run fails, when ranks differ: see
    # test_ranks_in_sync_detects_a_rank_that_differs)
    assert len(res["distributed"]["ranks_in_sync"]) == 2
    # each rank trained on half the data: 6 epochs x ceil(24*2/2 / 8) iterations
    assert res["train_iterations"] == [6 * 3, 6 * 3]
    assert_learned(res, 0.3)  # task-IL: chance 0.5
    assert _counts(res) == expected_parameters(res, "cifar_resnet20", 2)
    # the reported numbers equal a single-process evaluation of the same final model
    single = evaluate_checkpoint(parse_config(run_args))
    assert single == res["accuracy_matrix"][-1]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--benchmark", "arrays", "--data", "/no/such/file.npz"], "Data file not found"),
        (["--backbone", "torchvision:mobilenet_v2", "--target-modules", "features.2.conv.1.0",
          "--conv-mode", "loralib"], "grouped/depthwise"),
        (["--target-modules", "bn1"], "LoRA cannot wrap: bn1 (BatchNorm2d)"),
        (["--method", "eblora", "--conv-mode", "loralib"], "not an option of eblora"),
    ],
)
def test_more_bad_input(tmp_path, capsys, extra, match):
    data = _made_data(tmp_path)
    args = ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "3", "--backbone", "cifar_resnet20",
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args + extra) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--benchmark", "imagenet"], ["--conv-mode", "3x3"], ["--method", "lora"]])
def test_unknown_choices_exit_with_usage(flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(flag)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["inflora", "sd_lora", "o_lora", "hide_lora"])
def test_peer_methods_resume_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch, method):
    """A run stopped after its second checkpoint and resumed gives the uninterrupted run's numbers: the plugins'
    state (subspaces, pending directions and magnitudes, the shared model and class statistics) survives.

    InfLoRA, SD-LoRA and O-LoRA run task-incremental: their class-incremental loss covers the current experience's
    classes only, so over three experiences of made data which head rows win across experiences is arbitrary (a
    later experience's accuracy went down to 0 on some seeds) and learning could not be asserted; HiDe-LoRA is
    class-incremental only (its classifier alignment makes the rows comparable). 6 epochs: with 4, O-LoRA left an
    experience at chance on one seed of four."""
    import experiments.checkpoint as ckpt

    data = _made_data(tmp_path, per_class=12)
    task_il = method != "hide_lora"
    args = ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "3", "--backbone", "cifar_resnet20",
            "--method", method, "--batch-size", "4", "--seed", "1", "--threads", "1", "--no-progress",
            *_learning(tmp_path, data, 6), *_LORA, *(["--task-incremental"] if task_il else
                                                    # lr scaled by batch / 256: 0.64 at batch 4 is 0.01
                                                    ["--lr", "0.64", "--ca-epochs", "10", "--ca-lr", "0.05",
                                                     "--n-centroids", "2"])]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    reference = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert_learned(reference, 0.3 if task_il else 0.2)  # chance 1/2 (task-IL); 1/2, 1/4, 1/6 (class-IL)
    assert _counts(reference) == expected_parameters(reference, "cifar_resnet20", 2, n_centroids=2)
    assert evaluate_checkpoint(parse_config(args + ["--out", str(tmp_path / "ref")])) == \
        reference["accuracy_matrix"][-1]

    real_save, calls = ckpt.save_checkpoint, []

    def save_then_die(*a, **kw):
        real_save(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after the second experience")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    out = tmp_path / "killed"
    assert main(args + ["--out", str(out)]) == 130  # Ctrl-C: exit 130 with the command that continues
    err = capsys.readouterr().err
    assert "interrupted" in err and f"--out {out} --resume" in err and "Traceback" not in err
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert main(args + ["--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["resumed_at"] == [2]
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert [p["stored"] for p in resumed["parameters"]] == [p["stored"] for p in reference["parameters"]]
    assert resumed.get("tii_accuracy") == reference.get("tii_accuracy")


@pytest.mark.parametrize("method", ["sd_lora", "hide_lora"])
def test_torchrun_ddp_peer_methods_stay_in_sync(tmp_path, method):
    """SD-LoRA adds a magnitude parameter per task, HiDe-LoRA trains a second model outside DDP: both keep the
    ranks bit-identical and report the single-process numbers."""
    data = _made_data(tmp_path, n_classes=4, per_class=24)
    out = tmp_path / "ddp"
    run_args = ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--backbone",
                "cifar_resnet20", "--method", method, "--batch-size", "8", *_LORA,
                "--seed", "3", "--out", str(out), "--no-progress", "--threads", "1", *_learning(tmp_path, data, 6),
                *(["--lr", "0.32", "--ca-epochs", "10", "--ca-lr", "0.05", "--n-centroids", "2"]
                  if method == "hide_lora" else [])]  # hide_lora: lr x batch / 256
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "experiments.run", *run_args], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and len(res["distributed"]["ranks_in_sync"]) == 2
    assert evaluate_checkpoint(parse_config(run_args)) == res["accuracy_matrix"][-1]
    assert_learned(res, 0.2)  # class-IL: chance 1/2, then 1/4
    assert _counts(res) == expected_parameters(res, "cifar_resnet20", 2, n_centroids=2)


def test_ranks_in_sync_detects_a_rank_that_differs(monkeypatch):
    """The check run after every experience of a torchrun job: the other rank's tensor hashes are those of another
    model (one buffer changed), or another plugin state (one tensor changed); it must raise and name them, and pass
    for an identical copy."""
    import copy

    from avalanche.distributed import DistributedHelper
    from torch import nn

    from experiments.run import _ranks_in_sync

    class Plugin:
        def __init__(self, bases):
            self.bases = bases

        def state_dict(self):
            return dict(subspaces={"layer": self.bases}, history=[1, 2])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    plugin = Plugin(torch.randn(3, 2))
    other_rank = {}

    def hashes_of(m, p=None):  # what _ranks_in_sync sends to the other ranks for this model and plugin
        monkeypatch.setattr(DistributedHelper, "gather_all_objects", lambda mine: other_rank.update(h=mine) or [mine])
        assert _ranks_in_sync(m, p) is True  # a single rank always agrees with itself
        return other_rank["h"]

    twin = hashes_of(copy.deepcopy(model), Plugin(plugin.bases.clone()))
    drifted_model = copy.deepcopy(model)
    drifted_model[1].running_mean[2] += 1e-6  # e.g. BatchNorm statistics of one rank's shard
    drifted = hashes_of(drifted_model, plugin)
    drifted_plugin = hashes_of(model, Plugin(plugin.bases + 1e-6))

    monkeypatch.setattr(DistributedHelper, "gather_all_objects", lambda mine: [mine, twin])
    assert _ranks_in_sync(model, plugin) is True
    monkeypatch.setattr(DistributedHelper, "gather_all_objects", lambda mine: [mine, drifted])
    with pytest.raises(RuntimeError, match=r"different tensors after an experience: \['1.running_mean'\].*\(1 of 10\)"):
        _ranks_in_sync(model, plugin)
    monkeypatch.setattr(DistributedHelper, "gather_all_objects", lambda mine: [mine, drifted_plugin])
    with pytest.raises(RuntimeError, match=r"\['plugin.subspaces.layer'\]"):
        _ranks_in_sync(model, plugin)
