"""Print a Markdown table of finished runs, side by side.

    python -m experiments.report runs/merge runs/codyra runs/eblora [--relative-to runs/merge]

Columns: method, scenario, last accuracy (mean of the accuracy matrix's last row), average incremental accuracy
(mean over experiences of the accuracy on the experiences seen so far, as PILOT / InfLoRA report "A_avg"),
forgetting and BWT (Avalanche's definitions), inference and stored parameters after the last experience, train step
time, with ``--relative-to`` the step time as a ratio of that run's, and for methods that infer the task
(HiDe-LoRA) the mean task-identity-inference accuracy after the last experience.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["load_run", "table", "main"]


def load_run(path: str | Path) -> dict:
    """``results.json`` of a run directory (or the file itself), with a clear error when absent or broken."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"No results.json at {p}")
    try:
        res = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from e
    if not res.get("accuracy_matrix"):
        raise ValueError(f"{p} has no finished experience yet.")
    res["_path"] = str(p.parent)
    return res


def _fmt(v, pct=True):
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:,}"


def table(runs: list[dict], relative_to: dict | None = None) -> str:
    head = ["run", "method", "scenario", "last acc %", "avg inc acc %", "forgetting %", "BWT %",
            "inference params", "stored params", "step ms"]
    if relative_to is not None:
        head.append(f"step / {relative_to['method']}")
    tii = any(r.get("tii_accuracy") for r in runs)
    if tii:  # methods that infer the task (hide_lora): mean task-identity accuracy after the last experience
        head.append("TII %")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        p = r["parameters"][-1]
        avg = r["average_accuracy"]
        step = r.get("train_step_time_s")
        cells = [
            Path(r["_path"]).name, r["method"], r["benchmark"]["scenario"], _fmt(r["final_average_accuracy"]),
            _fmt(sum(avg) / len(avg)), _fmt(r["average_forgetting"]), _fmt(r["bwt"]),
            _fmt(p.get("inference", p["total"]), False), _fmt(p.get("stored", p["total"]), False),
            "-" if step is None else f"{1000 * step:.1f}",
        ]
        if relative_to is not None:
            ref = relative_to.get("train_step_time_s")
            cells.append("-" if not (step and ref) else f"{step / ref:.2f}")
        if tii:
            last = [v for v in (r.get("tii_accuracy") or [[]])[-1] if v is not None]
            cells.append(_fmt(sum(last) / len(last)) if last else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (or results.json files)")
    ap.add_argument("--relative-to", help="run whose train step time is the unit of the last column")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
        ref = load_run(args.relative_to) if args.relative_to else None
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(runs, ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
