"""Reliability: resume after SIGKILL gives the uninterrupted result, checkpoints are checked and loaded safely,
torchrun DDP keeps ranks identical and reports single-process numbers, bad input fails fast and clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.run import evaluate_checkpoint, main, parse_config

ROOT = Path(__file__).resolve().parents[1]


def _made_data(tmp_path, n_classes=6, per_class=40):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes), per_class)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    x[..., 1] = (y * 40)[:, None, None]
    path = tmp_path / "made.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[::4], y_test=y[::4])
    return path


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
    assert (out / "log.txt").read_text().startswith(log_before)  # the log was appended, not rewritten
    assert (out / "csv" / "eval_results.csv").is_file()
    assert (out / f"csv-resumed-at-{partial['experiences_done']}").is_dir()


def test_resume_refuses_other_run_corrupt_and_malicious_checkpoints(tmp_path, capsys):
    data = _made_data(tmp_path)
    out = tmp_path / "run"
    args = ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "3", "--backbone", "cifar_resnet20",
            "--batch-size", "16", "--out", str(out), "--no-progress"]
    assert main(args + ["--resume"]) == 2
    assert "No checkpoint to resume from" in capsys.readouterr().err
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--resume", "--method", "naive"]) == 2
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
                "cifar_resnet20", "--method", "merge_lora", "--task-incremental", "--batch-size", "8", "--epochs", "2",
                "--seed", "3", "--out", str(out), "--no-progress", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "experiments.run", *run_args], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["distributed"]["world_size"] == 2 and res["distributed"]["backend"] == "gloo"
    assert res["distributed"]["ranks_in_sync"] == [True, True]  # bit-identical parameters after every experience
    # each rank trained on half the data: 2 ranks x ceil(24*2/2 / 8) iterations per epoch
    assert res["train_iterations"] == [2 * 3, 2 * 3]
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
    state (subspaces, pending directions and magnitudes, the shared model and class statistics) survives."""
    import experiments.checkpoint as ckpt

    data = _made_data(tmp_path, per_class=12)
    args = ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "3", "--backbone", "cifar_resnet20",
            "--method", method, "--batch-size", "8", "--r", "2", "--seed", "1", "--threads", "1", "--no-progress",
            "--lr", "0.02", *(["--ca-epochs", "2", "--n-centroids", "2"] if method == "hide_lora" else [])]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    reference = json.loads((tmp_path / "ref" / "results.json").read_text())
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
                "cifar_resnet20", "--method", method, "--batch-size", "8", "--lora-r", "2", "--epochs", "2",
                "--seed", "3", "--out", str(out), "--no-progress", "--threads", "1",
                *(["--ca-epochs", "2", "--n-centroids", "2"] if method == "hide_lora" else [])]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "experiments.run", *run_args], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and res["distributed"]["ranks_in_sync"] == [True, True]
    assert evaluate_checkpoint(parse_config(run_args)) == res["accuracy_matrix"][-1]
