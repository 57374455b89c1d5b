"""The benchmark scripts run and print their tables (no timing thresholds: this machine is noisy)."""

from experiments import bench_methods, bench_speed


def test_bench_speed_quick_prints_the_table(capsys, tmp_path):
    assert bench_speed.main(["--quick", "--models", "vit,resnet18,resnet32", "--json", str(tmp_path / "s.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    tables = "\n".join(lines).split("\n\n")  # the speed table, then the memory table
    table = [ln for ln in tables[0].splitlines() if ln.startswith("|")]
    assert table[0].startswith("| model | full step | frozen floor | ours step | ours / floor | unfused / floor")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["vit", "resnet18", "resnet32"]
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(c for c in cells[:7]) and all(float(c) > 0 for c in cells[1:7])
    memory = [ln for ln in tables[1].splitlines() if ln.startswith("|")]
    assert memory[0].startswith("| model | saved full | saved ours") and len(memory) == 5
    for row in memory[2:]:  # LoRA keeps (almost) every activation full fine-tuning keeps
        cells = [float(c) for c in row.strip("|").split("|")[1:]]
        assert cells[1] > 0.8 * cells[0] and cells[3] < cells[2]
    assert (tmp_path / "s.json").stat().st_size > 0


def test_bench_methods_prints_ratios(capsys):
    assert bench_methods.main(["--methods", "merge_lora,codyra,naive", "--backbone", "cifar_resnet20", "--rounds", "1",
                               "--iters", "3", "--batch-size", "8", "--r", "2"]) == 0
    out = capsys.readouterr().out
    assert "| merge_lora |" in out and "| 1.00 |" in out and "| codyra |" in out and "whole run / merge_lora" in out
    assert "| naive |" in out  # a baseline without adapters runs beside them
