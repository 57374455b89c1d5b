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
