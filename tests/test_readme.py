"""The README's Python API example runs as written (on the shared CIFAR-10 and ResNet-32) and learns."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_python_example_runs(cifar10_npz, resnet32_weights, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    res = namespace["results"]
    acc = [v for k, v in res.items() if k.startswith("Top1_Acc_Exp/eval_phase/test_stream")]
    assert len(acc) == 5
    # task-IL, 2 classes per task (chance 0.5); measured 0.62-0.93 after the last experience
    assert sum(acc) / len(acc) > 0.6, acc
