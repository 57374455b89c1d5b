"""The catalogue of bad input a new user meets: each exits 2 before any training, with one line naming the
problem and the fix (no traceback). README's "Bad input" list is checked against this catalogue."""

import re
from pathlib import Path

import numpy as np
import pytest

from experiments.run import main

ROOT = Path(__file__).resolve().parents[1]

# (flag named in README, extra arguments, message); "{tmp}" is the test's directory
CATALOGUE = [
    ("--target-modules", ["--target-modules", "["], "is not a valid regular expression"),
    ("--exclude-modules", ["--exclude-modules", "(a"], "is not a valid regular expression"),
    ("--out", ["--out", "{tmp}/afile"], "is an existing file; give a directory"),
    ("--image-size", ["--image-size", "0"], "--image-size must be an integer >= 1"),
    ("--threads", ["--threads", "0"], "--threads must be an integer >= 1"),
    ("--num-workers", ["--num-workers", "-1"], "--num-workers must be an integer >= 0"),
    ("--subset", ["--subset", "0"], "--subset must be an integer >= 1"),
    ("--epochs", ["--epochs", "0"], "--epochs must be an integer >= 1"),
    ("--batch-size", ["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    ("--r", ["--r", "0"], "--r must be an integer >= 1"),
    ("--alpha", ["--alpha", "0"], "--alpha must be > 0"),
    ("--dropout", ["--dropout", "1"], "--dropout must be in [0, 1)"),
    ("--lr", ["--lr", "0"], "--lr must be > 0"),
    ("--weight-decay", ["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    ("--warmup", ["--warmup", "1.5"], "--warmup must be in [0, 1)"),
    ("--betas", ["--betas", "0.9"], "--betas must be two numbers"),
    ("--max-kappa", ["--method", "inflora", "--max-kappa", "0.1"], "--max-kappa is not an option of inflora"),
    ("--dense-fraction", ["--method", "codyra", "--dense-fraction", "1.5"], "dense_fraction must be in [0, 1)"),
    ("--lamb", ["--method", "inflora", "--lamb", "1.5"], "0 < lamb <= lame <= 1"),
    ("--replay", ["--method", "replay", "--replay", "5"], "set its size with --mem-size, not --replay"),
    ("--validation", ["--validation", "0"], "--validation must be an integer >= 1"),
    ("--validation", ["--validation", "8"], "too few to hold out 4 and still train"),
]


def _data(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 4)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    return tmp_path / "d.npz"


@pytest.mark.parametrize("flag,extra,message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, flag, extra, message):
    (tmp_path / "afile").write_text("not a directory")
    args = ["--benchmark", "arrays", "--data", str(_data(tmp_path)), "--n-experiences", "3",
            "--backbone", "cifar_resnet20", "--no-progress", "--out", str(tmp_path / "o")]
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "results.json").exists()  # nothing trained


def test_readme_lists_every_bad_input():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"Bad input stops before any training(.*?)(\n## |\Z)", text, re.S).group(1)
    missing = [flag for flag, _, _ in CATALOGUE if f"`{flag}" not in section]
    assert not missing, f"README's bad-input list lacks {missing}"


def _child_env():
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="")
    return env


def test_cli_prints_no_third_party_import_noise():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "experiments.run", "--help"], cwd=ROOT, env=_child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--normalization" in proc.stdout
    assert "QP solver" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_ctrl_c_keeps_results_and_prints_the_resume_command(tmp_path):
    """A real SIGINT (the default handler restored in the child: background jobs start with SIGINT ignored) after
    the first experience's checkpoint: exit 130, one line with the exact command that continues, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    data = _data(tmp_path)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "experiments.run", "--benchmark", "arrays", "--data", str(data),
            "--n-experiences", "3", "--backbone", "cifar_resnet20", "--epochs", "30", "--batch-size", "4",
            "--no-progress", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "continue with: python -m experiments.run" in err
    assert f"--out {out} --resume" in err
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["experiences_done"] >= 1 and not res["finished"]
