"""The benchmark scripts run and print their tables (no timing thresholds: this machine is noisy)."""

from experiments import bench_methods, bench_speed


def test_bench_speed_quick_prints_the_table(capsys, tmp_path):
    assert bench_speed.main(["--quick", "--models", "vit,resnet18,resnet32", "--json", str(tmp_path / "s.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0].startswith("| model | full step | ours step | ours / full")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["vit", "resnet18", "resnet32"]
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(c for c in cells[:4]) and float(cells[3]) > 0
    assert (tmp_path / "s.json").stat().st_size > 0


def test_bench_methods_prints_ratios(capsys):
    assert bench_methods.main(["--methods", "merge_lora,codyra", "--backbone", "cifar_resnet20", "--rounds", "1",
                               "--iters", "3", "--batch-size", "8", "--r", "2"]) == 0
    out = capsys.readouterr().out
    assert "| merge_lora |" in out and "| 1.00 |" in out and "| codyra |" in out
