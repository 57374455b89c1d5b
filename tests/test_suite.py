"""Smoke test of the comparison suite: each protocol with ``--quick`` on the real data and weights (every row, a few
images), then the same command again, which must skip every finished run. Slow (real data), run by CI."""

from __future__ import annotations

import csv
import json

import pytest

from experiments.suite import PROTOCOL_DIR, main


@pytest.mark.parametrize("protocol", ["q1", "q2"])
def test_quick_protocol_writes_tables_claims_figures_and_resumes(protocol, tmp_path, capsys, cifar10_npz, mnist_npz,
                                                                 resnet32_weights, mobilenet_v2_weights):
    yaml_before = (PROTOCOL_DIR / f"{protocol}.yaml").read_text()
    out = tmp_path / "suite"
    assert main(["--protocol", protocol, "--quick", "--out", str(out), "--threads", "2"]) == 0
    log = capsys.readouterr().out
    rows = [line for line in log.splitlines() if line.startswith("[") and not line.startswith("[select")]
    assert rows and all("[ran]" in line for line in rows)
    assert (PROTOCOL_DIR / f"{protocol}.yaml").read_text() == yaml_before  # --quick never writes its lrs back
    for scenario in ("class_il", "task_il"):
        with open(out / f"table_{scenario}.csv") as f:
            table = list(csv.DictReader(f))
        names = {r["method"] for r in table}
        assert {"naive", "ewc", "lwf", "replay", "ncm", "linear_probe", "joint", "merge_lora", "inflora"} <= names
        assert all(r["seeds"].startswith("1") for r in table), table  # every row ran (one seed in --quick)
        joint = next(r for r in table if r["method"] == "joint")
        assert joint["last ÷ joint"] == "1.00" and joint["forgetting %"] == "–"
        for stem in ("curves", "acc_vs_stored"):
            assert (out / f"{stem}_{scenario}.png").stat().st_size > 10_000
    claims = (out / "claims.md").read_text()
    assert claims.count("\n| ") >= 2 and "**" in claims
    if protocol == "q2":
        assert (out / "rank_sweep_task_il.png").is_file() and (out / "retention_vs_acc_task_il.png").is_file()
        res = json.loads(next((out / "runs" / "task_il" / "merge_lora").glob("seed*/results.json")).read_text())
        assert res["pretraining_accuracy"] > 0.5 and len(res["pretraining_retention"]) == 2
    assert (out / "selection.md").read_text().count("**chosen**") >= 10
    # the same command again: nothing runs twice
    assert main(["--protocol", protocol, "--quick", "--out", str(out), "--threads", "2"]) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert again and all("[done before]" in line for line in again)
