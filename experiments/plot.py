"""Figures of finished runs, as PNG and PDF.

    python -m experiments.plot runs/merge runs/codyra runs/eblora --out figures

Writes, for every run, ``<run>_accuracy_matrix`` (heatmap), ``<run>_ranks`` (rank used per module × experience)
and ``<run>_spectra`` (singular values of each module's update after the last experience, normalised by the
largest) when the run recorded them; for all runs together, ``curves`` (average accuracy and forgetting after each
experience) and ``accuracy_vs_parameters`` (last accuracy against stored parameters).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .report import load_run

__all__ = ["plot_runs", "main"]


def _name(run: dict) -> str:
    return Path(run["_path"]).name


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=120)
    return paths


def forgetting_curve(matrix) -> list[float | None]:
    """Average forgetting after each experience i: mean over j < i of R[j][j] - R[i][j] (None for i = 0)."""
    out = [None]
    for i in range(1, len(matrix)):
        out.append(float(np.mean([matrix[j][j] - matrix[i][j] for j in range(i)])))
    return out


def plot_runs(runs: list[dict], out: str | Path) -> list[Path]:
    """Draw every figure the runs allow into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    for run in runs:
        m = np.array([[np.nan if v is None else v for v in row] for row in run["accuracy_matrix"]], dtype=float)
        fig, ax = plt.subplots(figsize=(1.1 * m.shape[1] + 2, 0.9 * m.shape[0] + 1.5))
        im = ax.imshow(100 * m, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xlabel("test experience")
        ax.set_ylabel("after training experience")
        ax.set_title(f"{_name(run)}: accuracy (%)")
        fig.colorbar(im, ax=ax)
        written += _save(fig, out, f"{_name(run)}_accuracy_matrix")
        plt.close(fig)

        ranks = run.get("rank_usage")
        if ranks:
            modules = list(ranks[0])
            grid = np.array([[h.get(mod, np.nan) for h in ranks] for mod in modules], dtype=float)
            fig, ax = plt.subplots(figsize=(0.6 * len(ranks) + 3, 0.22 * len(modules) + 1.5))
            im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0)
            ax.set_yticks(range(len(modules)), modules, fontsize=6)
            ax.set_xticks(range(len(ranks)))
            ax.set_xlabel("experience")
            ax.set_title(f"{_name(run)}: rank used per module")
            fig.colorbar(im, ax=ax)
            written += _save(fig, out, f"{_name(run)}_ranks")
            plt.close(fig)

        spectra = run.get("spectra")
        if spectra:
            fig, ax = plt.subplots(figsize=(6, 4))
            last_index = 1
            for mod, v in spectra[-1].items():
                s = np.array(v["singular_values"], dtype=float)
                if s.size and s[0] > 0:
                    ax.semilogy(np.arange(1, len(s) + 1), s / s[0], lw=0.8, alpha=0.7)
                    last_index = max(last_index, int((s / s[0] > 1e-6).sum()))
            ax.set_xlim(0.5, last_index + 2.5)
            imb = [v["top1_energy"] for v in spectra[-1].values() if v["top1_energy"] is not None]
            ax.set_ylim(1e-6, 2)  # below that: float32 rounding of a low-rank update
            ax.set_xlabel("singular value index")
            ax.set_ylabel("σ_i / σ_1")
            ax.set_title(f"{_name(run)}: update spectra, last experience\n(mean share of σ1²: {np.mean(imb):.2f})"
                         if imb else f"{_name(run)}: update spectra")
            written += _save(fig, out, f"{_name(run)}_spectra")
            plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        acc = run["average_accuracy"]
        x = np.arange(1, len(acc) + 1)
        a1.plot(x, 100 * np.array(acc), marker="o", label=_name(run))
        f = forgetting_curve(run["accuracy_matrix"])
        a2.plot(x[1:], [100 * v for v in f[1:]], marker="o", label=_name(run))
    a1.set(xlabel="experiences trained", ylabel="average accuracy on seen experiences (%)", title="accuracy")
    a2.set(xlabel="experiences trained", ylabel="average forgetting (%)", title="forgetting")
    a1.legend(fontsize=8)
    written += _save(fig, out, "curves")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        p = run["parameters"][-1]
        ax.scatter(p.get("stored", p["total"]), 100 * run["final_average_accuracy"], s=40)
        ax.annotate(_name(run), (p.get("stored", p["total"]), 100 * run["final_average_accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="stored parameters", ylabel="last accuracy (%)", title="accuracy vs stored parameters")
    written += _save(fig, out, "accuracy_vs_parameters")
    plt.close(fig)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (or results.json files)")
    ap.add_argument("--out", required=True, help="directory for the figures")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in plot_runs(runs, args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
