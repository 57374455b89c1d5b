"""The comparison suite: every method against the standard baselines, one command per protocol.

    python -m experiments.suite --protocol q1|q2 [--seeds 1234,0,1] [--quick] [--out DIR] [--threads N] [--records DIR]
                                [--status | --report [--readme README.md]]

A protocol is a YAML file in ``experiments/configs/suite/`` (``common`` run options, ``rows``, ``seeds``,
``scenarios``, the ``selection`` of each row's learning rate). The suite

1. chooses each row's learning rate (and any other ``tune``-d option) on a **validation split** carved from the
   training data (``experiments.run --validation``; the test set is never seen), on the selection seed and scenario,
   from the row's grid (multiples of the method's own default lr; when the best is at an end of the grid, the grid
   grows by a factor of 3 that way, at most ``max_extensions`` times), and writes the chosen values at the end of the
   protocol's YAML (below the marker line) and into ``<out>/selection.md``;
2. runs every row, seed and scenario (seeds outermost, so the first seed of every row comes first), each as its own
   ``python -m experiments.run`` process writing ``<out>/runs/<scenario>/<row>/seed<seed>/``;
3. rewrites after every run, in ``<out>`` and the records folder, the tables (``table_<scenario>.md|csv``, mean ±
   std over the seeds done), the claims table (``claims.md``) and the figures (``*.png``).

It resumes after a kill: a finished run (or one stopped by a non-finite loss, which is a result) is skipped, a killed
one continues from its last checkpoint (or starts again when its method keeps state a checkpoint cannot hold: EWC,
LwF, replay). Every finished run is also recorded, compactly, in ``--records`` (default ``docs/results/<protocol>``,
next to the published tables and figures): committed, the records let the same command in a fresh clone skip what
is done. ``--quick`` runs every row on a few images, for the smoke test (no records, its selection not written back).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["load_protocol", "plan", "aggregate", "claims", "readme_section", "write_readme", "main", "PROTOCOL_DIR",
           "MARKER"]

PROTOCOL_DIR = Path(__file__).parent / "configs" / "suite"
MARKER = "# --- chosen on the validation split by python -m experiments.suite (rewritten by it; do not edit below) ---"
SCENARIOS = ("class_il", "task_il")
_ENV = re.compile(r"\$\{?(\w+)\}?")


def _expand(value, where: str):
    """``$VAR`` / ``${VAR}`` in strings replaced from the environment; an unset variable is an error."""
    if isinstance(value, dict):
        return {k: _expand(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if isinstance(value, str):
        for var in _ENV.findall(value):
            if var not in os.environ:
                raise ValueError(f"{where} needs ${var} (e.g. export {var}=../shared/"
                                 f"{'weights' if 'WEIGHTS' in var else 'data'}); it is not set.")
        return _ENV.sub(lambda m: os.environ[m.group(1)], value)
    return value


def load_protocol(name_or_path: str) -> dict:
    """The protocol's YAML (``q1``, ``q2`` or a path), environment variables expanded, checked."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = PROTOCOL_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))
        raise ValueError(f"No protocol {name_or_path!r}: give one of {', '.join(known)} or a YAML path.")
    proto = yaml.safe_load(path.read_text()) or {}
    for key in ("common", "rows", "seeds", "scenarios", "selection"):
        if key not in proto:
            raise ValueError(f"{path}: missing '{key}'.")
    proto = _expand(proto, str(path))
    proto["path"] = str(path)
    proto.setdefault("selected", {})
    proto["selected"] = proto["selected"] or {}
    names = [r["name"] for r in proto["rows"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names must be unique, got {names}.")
    for r in proto["rows"]:
        for s in r.get("scenarios", proto["scenarios"]):
            if s not in SCENARIOS:
                raise ValueError(f"{path}: row {r['name']}: unknown scenario {s!r}; use {SCENARIOS}.")
        if r.get("lr_from") and r["lr_from"] not in names:
            raise ValueError(f"{path}: row {r['name']}: lr_from {r['lr_from']!r} is not a row.")
    return proto


def _cli(opts: dict) -> list[str]:
    """``experiments.run`` arguments from ``{option: value}`` (``scenario`` becomes the task/class flag)."""
    args: list[str] = []
    for k, v in opts.items():
        if v is None:
            continue
        if k == "scenario":
            args.append("--task-incremental" if v == "task_il" else "--class-incremental")
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, (list, tuple)):
            args += [flag, ",".join(str(x) for x in v)]
        else:
            args += [flag, str(v)]
    return args


def _row_options(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("name", "scenarios", "tune", "lr_from", "group", "label",
                                                        "seeds", "sweep")}


def _default_lr(row: dict) -> float:
    from .run import REGISTRY

    return REGISTRY[row["method"]].recipe.lr


def _grid(proto: dict, row: dict) -> list[dict]:
    """The selection grid of ``row``: ``lr`` = the method's default × each factor, times any ``tune`` options."""
    if row.get("lr_from") or row.get("tune") == "none":
        return []
    tune = dict(row.get("tune") or {})
    factors = tune.pop("lr_factors", proto["selection"]["lr_factors"])
    points = [{"lr": float(f"{_default_lr(row) * f:.3g}")} for f in factors]
    for key, values in tune.items():
        points = [dict(p, **{key: v}) for p in points for v in values]
    return points


def _extend(results: list, budget: int) -> float | None:
    """The next lr to try when the best validation accuracy sits at an end of the lrs tried so far (a third of the
    smallest, or three times the largest; the smallest's third when every run diverged), else ``None``."""
    if budget <= 0 or not results:
        return None
    lrs = sorted({p["lr"] for p, _ in results})
    if all(acc is None for _, acc in results):
        return float(f"{lrs[0] / 3:.3g}")
    best = max(results, key=lambda p: -1 if p[1] is None else p[1])[0]["lr"]
    if len(lrs) > 1 and best == lrs[0]:
        return float(f"{lrs[0] / 3:.3g}")
    if len(lrs) > 1 and best == lrs[-1]:
        return float(f"{lrs[-1] * 3:.3g}")
    return None


def _tag(point: dict) -> str:
    return "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(point.items()))


def plan(proto: dict, *, quick: bool, seeds: list[int], out: Path) -> tuple[list, list]:
    """``(selection runs, main runs)``: each ``(row, scenario, seed, options, run dir)``."""
    quick_opts = dict(proto.get("quick") or {}) if quick else {}
    sel = dict(proto["selection"], **quick_opts.pop("selection", {}))
    sel_validation = quick_opts.pop("validation", sel["validation"])
    common = dict(proto["common"], **quick_opts)
    selection = []
    for row in proto["rows"]:
        scenarios = row.get("scenarios", proto["scenarios"])
        scenario = sel["scenario"] if sel["scenario"] in scenarios else scenarios[0]  # e.g. class-IL-only methods
        # ``per_scenario``: these scenarios get their own choice too (key ``<row>@<scenario>``)
        keyed = [(scenario, row["name"])] + [(sc, f"{row['name']}@{sc}") for sc in sel.get("per_scenario", [])
                                             if sc in scenarios and sc != scenario]
        for sc, key in keyed:
            for point in _grid(dict(proto, selection=sel), row):
                opts = dict(common, **_row_options(row), **point, seed=sel["seed"], scenario=sc,
                            validation=sel_validation)
                selection.append((dict(row, key=key), sc, sel["seed"], point, opts,
                                  out / "select" / key / _tag(point)))
    runs = []
    for seed in seeds:
        for scenario in proto["scenarios"]:
            for row in proto["rows"]:
                if scenario not in row.get("scenarios", proto["scenarios"]):
                    continue
                if seed not in row.get("seeds", seeds):
                    continue
                opts = dict(common, **_row_options(row), seed=seed, scenario=scenario)
                runs.append((row, scenario, seed, None, opts, out / "runs" / scenario / row["name"] / f"seed{seed}"))
    return selection, runs


def _load(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Records:
    """Compact copies of finished runs' ``results.json`` (``<directory>/records/<run path under out>.json``),
    committed with the tables: a fresh clone (a later session, another machine) continues the suite where it stopped,
    skipping every recorded run, and rebuilds the tables from them. Per-module spectra and rank usage (the bulk of a
    LoRA run's file) and Avalanche's cross-check values are left out; the tables do not use them.
    ``directory=None``: no records (the run folders only)."""

    HEAVY = ("spectra", "rank_usage", "avalanche")

    def __init__(self, out: Path, directory: Path | None):
        self.out, self.dir = Path(out), None if directory is None else Path(directory)

    def path(self, run_dir: Path) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / "records" / f"{Path(run_dir).relative_to(self.out).as_posix()}.json"

    def load(self, run_dir: Path) -> dict | None:
        """The run folder's results when it finished, else the record of an earlier finished run, else whatever
        the folder holds (a killed run's partial results, or nothing)."""
        res = _load(run_dir)
        if _done(res) or self.dir is None:
            return res
        try:
            return json.loads(self.path(run_dir).read_text())
        except (OSError, json.JSONDecodeError):
            return res

    def save(self, run_dir: Path, res: dict | None) -> None:
        if self.dir is None or not _done(res):
            return
        path = self.path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in res.items() if k not in self.HEAVY}, indent=1))
        os.replace(tmp, path)


def _matches(res: dict, opts: dict) -> bool:
    """Whether a run's recorded config is the one ``opts`` asks for (a finished run of an older protocol is not)."""
    cfg = res.get("config", {})
    for k, v in opts.items():
        if k == "scenario":
            if cfg.get("task_incremental") != (v == "task_il"):
                return False
            continue
        got = cfg.get(k)
        if isinstance(v, (list, tuple)) or isinstance(got, (list, tuple)):
            if list(v or []) != list(got or []):
                return False
        elif isinstance(v, float) or isinstance(got, float):
            if got is None or v is None or abs(float(got) - float(v)) > 1e-12 * max(1.0, abs(float(v))):
                return False
        elif str(got) != str(v):
            return False
    return True


def _done(res: dict | None) -> bool:
    return bool(res) and (res.get("finished") or bool(res.get("stopped")))


def _execute(cmd: list[str], log, env: dict, in_process: bool) -> tuple[int, str]:
    """``(exit code, stderr)`` of ``python -m experiments.run`` in a process of its own, or in this one (``--quick``:
    no interpreter start-up per run)."""
    if not in_process:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env,
                           cwd=Path(__file__).resolve().parent.parent)
        return p.returncode, p.stderr
    import contextlib
    import io

    from .run import main as run_main

    err = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(err):
        code = run_main(cmd[3:])
    return code, err.getvalue()


def run_one(opts: dict, run_dir: Path, *, threads: int, in_process: bool = False,
            records: Records | None = None) -> tuple[dict, str]:
    """Run (or resume, or skip) one ``experiments.run``; ``(results, what happened)``. A finished run in
    ``run_dir`` or in ``records`` is skipped; a new result is recorded. A configuration error stops the suite (it is
    a bug of the protocol, not a result)."""
    records = records or Records(run_dir, None)
    res = records.load(run_dir)
    if _done(res) and _matches(res, opts):
        if records.dir and not records.path(run_dir).is_file():  # finished before records were kept
            records.save(run_dir, res)
        return res, "done before"
    if res is not None and not _matches(res, opts) and run_dir.exists():  # the protocol changed: not one of its rows
        stale = run_dir.with_name(run_dir.name + f".stale-{int(time.time())}")
        run_dir.rename(stale)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))
    base = [sys.executable, "-m", "experiments.run", *_cli(opts), "--out", str(run_dir), "--threads", str(threads),
            "--no-progress"]
    how = "ran"
    attempts = [base + ["--resume"], base] if (run_dir / "checkpoint.pt").is_file() else [base]
    for k, cmd in enumerate(attempts):
        if k == 1 or (len(attempts) == 1 and run_dir.exists()):
            shutil.rmtree(run_dir, ignore_errors=True)  # a killed run that cannot resume starts again
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "stdout.txt", "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            code, stderr = _execute(cmd, log, env, in_process)
        if code in (0, 3):  # 3: stopped by a non-finite loss, its finished experiences kept
            how = "resumed" if "--resume" in cmd else how
            res = _load(run_dir)
            records.save(run_dir, res)
            return res, how
        if code == 130 or code < 0:  # Ctrl-C, or the run was killed by a signal: not a result, resume later
            raise KeyboardInterrupt
        if "--resume" in cmd:
            continue
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{run_dir}: experiments.run failed (exit {code}): {tail}\n  command: "
                           f"{' '.join(cmd)}")
    raise AssertionError("unreachable")


def _fmt_pct(values, digits=1):
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    m = 100 * float(np.mean(vals))
    return f"{m:.{digits}f} ± {100 * float(np.std(vals)):.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"


def _mean(values):
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _count(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _chance(res: dict) -> float | None:
    """The last accuracy of a model that guesses: 1 / classes seen (class-IL), the mean of 1 / classes per task over
    the tasks (task-IL)."""
    sizes = [len(c) for c in (res.get("benchmark") or {}).get("classes_per_experience") or []]
    if not sizes:
        return None
    if res["benchmark"].get("scenario") == "task-incremental":
        return float(np.mean([1.0 / s for s in sizes]))
    return 1.0 / sum(sizes)


def aggregate(proto: dict, runs: list, records: Records | None = None) -> dict:
    """``{scenario: {row: figures}}`` over the finished seeds of each (scenario, row)."""
    table: dict = {}
    load = records.load if records else _load
    for row, scenario, seed, _, opts, run_dir in runs:
        res = load(run_dir)
        entry = table.setdefault(scenario, {}).setdefault(row["name"], dict(row=row, seeds=[], results=[]))
        if _done(res) and _matches(res, opts):
            entry["seeds"].append(seed)
            entry["results"].append(res)
    for scenario, rows in table.items():
        for name, e in rows.items():
            rs = e["results"]
            e["diverged"] = sum(bool(r.get("stopped")) for r in rs)
            ok = [r for r in rs if r.get("finished")]
            e["A_last"] = [r["A_last"] for r in ok]
            # runs that end at chance (a collapse to one class, or nothing learnt): flagged in the table
            e["at_chance"] = sum(r["A_last"] <= _chance(r) + 0.01 for r in ok if _chance(r) is not None)
            e["A_avg"] = [r["A_avg"] for r in ok]
            e["forgetting"] = [r["average_forgetting"] for r in ok]
            e["bwt"] = [r["bwt"] for r in ok]
            e["retention"] = [r["pretraining_retention"][-1] for r in ok if r.get("pretraining_retention")]
            e["pretraining"] = [r["pretraining_accuracy"] for r in ok if r.get("pretraining_accuracy") is not None]
            e["relative_retention"] = [r["pretraining_retention"][-1] / r["pretraining_accuracy"] for r in ok
                                       if r.get("pretraining_retention") and r.get("pretraining_accuracy")]
            e["curve"] = [r["average_accuracy"] for r in ok]
            e["diagonal"] = [[row_[i] for i, row_ in enumerate(r["accuracy_matrix"])] for r in ok
                             if not r.get("config", {}).get("method") == "joint"]
            last = [r["parameters"][-1] for r in ok if r.get("parameters")]
            for k in ("trainable", "stored", "inference"):
                e[k] = max((p[k] for p in last), default=None)
            # stored parameters over the backbone's, in percent (the effects-of-LoRA study's "growth")
            e["growth_pct"] = max((p["growth_pct"] for p in last if p.get("growth_pct") is not None), default=None)
            e["wall"] = [r.get("wall_time_s") for r in ok]
            e["lr"] = ok[0]["training"]["lr"] if ok else None
            # the rate the optimizer used, where the recipe scales it by the batch (HiDe-LoRA: lr · batch / 256)
            e["effective_lr"] = ok[0]["training"].get("effective_lr", e["lr"]) if ok else None
            e["per_class_retention"] = [r.get("pretraining_retention_per_class", [None])[-1] for r in ok
                                        if r.get("pretraining_retention_per_class")]
            e["pretraining_per_class"] = [r.get("pretraining_accuracy_per_class") for r in ok
                                          if r.get("pretraining_accuracy_per_class")]
        joint = rows.get("joint")
        j = _mean(joint["A_last"]) if joint else None
        for e in rows.values():
            a = _mean(e["A_last"])
            e["last_over_joint"] = a / j if (a is not None and j) else None
    return table


_COLUMNS = ("row", "method", "lr", "last acc %", "A_avg %", "forgetting %", "BWT %", "last ÷ joint", "retention %",
            "retention ÷ pretraining", "trainable", "stored", "inference", "wall s", "seeds")


def _fmt_lr(e: dict) -> str:
    """The chosen lr as the CLI takes it, and the rate the optimizer used when the recipe scales it."""
    if e["lr"] is None:
        return "–"
    eff = e.get("effective_lr")
    if eff is None or abs(eff - e["lr"]) <= 1e-12 * e["lr"]:
        return f"{e['lr']:.3g}"
    return f"{e['lr']:.3g} (used: {eff:.3g})"


def _table_rows(proto: dict, rows: dict) -> list[list[str]]:
    out = []
    for name, e in rows.items():
        r = e["row"]
        seeds = f"{len(e['seeds'])}" + (f" ({e['diverged']} diverged)" if e["diverged"] else "")
        out.append([
            r.get("label", name), r["method"], _fmt_lr(e) if r["method"] != "ncm" else "–",
            _fmt_pct(e["A_last"]) + (f" ({e['at_chance']}/{len(e['A_last'])} at chance)" if e["at_chance"] else ""),
            _fmt_pct(e["A_avg"]) if r["method"] != "joint" else "–",
            _fmt_pct(e["forgetting"]) if r["method"] != "joint" else "–",
            _fmt_pct(e["bwt"]) if r["method"] != "joint" else "–",
            "–" if e["last_over_joint"] is None else f"{e['last_over_joint']:.2f}",
            _fmt_pct(e["retention"]), "–" if not e["relative_retention"] else f"{_mean(e['relative_retention']):.2f}",
            _count(e["trainable"]), _count(e["stored"]), _count(e["inference"]),
            "–" if _mean(e["wall"]) is None else f"{_mean(e['wall']):.0f}", seeds,
        ])
    return out


def write_tables(proto: dict, table: dict, out: Path) -> list[Path]:
    written = []
    for scenario, rows in table.items():
        body = _table_rows(proto, rows)
        md = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        md += ["| " + " | ".join(r) + " |" for r in body]
        p = out / f"table_{scenario}.md"
        p.write_text("\n".join(md) + "\n")
        with open(out / f"table_{scenario}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(_COLUMNS)
            w.writerows(body)
        written += [p, out / f"table_{scenario}.csv"]
    return written


def _get(table, scenario, name):
    e = table.get(scenario, {}).get(name)
    return e if e and e["A_last"] else None


def claims(proto: dict, table: dict) -> list[dict]:
    """The seed papers' claims that this protocol tests (``proto['claims']`` names them), each with a verdict from
    the measured figures: ``holds``, ``does not hold`` or ``not measured yet`` (rows missing)."""
    out = []
    m = lambda e, k: _mean(e[k])  # noqa: E731
    for claim in proto.get("claims", []):
        kind, sc = claim["kind"], claim.get("scenario", "task_il")
        verdict, figures = "not measured yet", ""
        if kind == "rank_forgetting":  # Soutif-Cormerais: higher rank, more forgetting of the pretraining task
            es = [(r, _get(table, sc, n)) for r, n in claim["rows"]]
            if all(e for _, e in es):
                ret = [m(e, "retention") for _, e in es]
                acc = [m(e, "A_last") for _, e in es]
                figures = "; ".join(f"r {r}: retention {100 * x:.1f} %, MNIST {100 * a:.1f} %"
                                    for (r, _), x, a in zip(es, ret, acc))
                falls = ret[-1] < ret[0] - claim.get("margin", 0.05)
                verdict = "holds" if falls else "does not hold"
        elif kind == "uniform_forgetting":  # Soutif-Cormerais: ResNets forget the pretraining classes uniformly
            e = _get(table, sc, claim["row"])
            if e and e["per_class_retention"] and e["pretraining_per_class"]:
                before = e["pretraining_per_class"][0]
                after = {c: _mean([d[c] for d in e["per_class_retention"]]) for c in before}
                drops = np.array([before[c] - after[c] for c in before])
                mean_drop, spread = float(drops.mean()), float(drops.std())
                worst = max(before, key=lambda c: before[c] - after[c])
                figures = (f"drop per class {100 * mean_drop:.1f} ± {100 * spread:.1f} points (mean ± std over the "
                           f"10 classes), largest class {worst}: {100 * (before[worst] - after[worst]):.1f}")
                # contextual forgetting would single out classes: the largest drop far above the others
                contextual = drops.max() > mean_drop + 3 * max(spread, 1e-9) and drops.max() > 0.1
                verdict = "does not hold" if contextual else "holds"
        elif kind == "more_retention":  # a method keeps more of the pretraining at equal or better new-task accuracy
            a, b = _get(table, sc, claim["row"]), _get(table, sc, claim["baseline"])
            if a and b:
                ra, rb, aa, ab = m(a, "retention"), m(b, "retention"), m(a, "A_last"), m(b, "A_last")
                figures = (f"{claim['row']}: retention {100 * ra:.1f} %, new tasks {100 * aa:.1f} %; "
                           f"{claim['baseline']}: {100 * rb:.1f} %, {100 * ab:.1f} %")
                verdict = "holds" if ra > rb and aa >= ab - claim.get("tolerance", 0.01) else "does not hold"
        elif kind == "fewer_ranks":  # a rank-pruning method keeps fewer ranks than the baseline's fixed r
            a, b = _get(table, sc, claim["row"]), _get(table, sc, claim["baseline"])
            if a and b:
                kept = [v for r in a["results"] for h in r.get("rank_history") or [] for v in h.values()]
                r_a, r_b = ((e["results"][0].get("model") or {}).get("lora") or {} for e in (a, b))
                if not kept or "r" not in r_a or "r" not in r_b:
                    figures = f"needs a rank history in {claim['row']} and a LoRA rank in both rows"
                else:
                    r_a, r_b = r_a["r"], r_b["r"]
                    figures = (f"{claim['row']}: {np.mean(kept):.1f} ranks kept per layer and task on average "
                               f"(min {min(kept)}, of r = {r_a}); {claim['baseline']}: r = {r_b}")
                    # pruned at all, and below the baseline's fixed rank
                    verdict = "holds" if np.mean(kept) < min(r_a, r_b) else "does not hold"
        elif kind == "less_forgetting":  # a method forgets less than another at the same rank
            a, b = _get(table, sc, claim["row"]), _get(table, sc, claim["baseline"])
            if a and b:
                fa, fb = m(a, "forgetting"), m(b, "forgetting")
                ra, rb = m(a, "retention"), m(b, "retention")
                figures = (f"forgetting {claim['row']} {100 * fa:.1f} vs {claim['baseline']} {100 * fb:.1f} points"
                           + (f"; retention {100 * ra:.1f} vs {100 * rb:.1f} %" if ra is not None else ""))
                verdict = "holds" if fa < fb else "does not hold"
        elif kind == "ranking":  # rows ordered as in the papers, by last accuracy
            es = [(n, _get(table, sc, n)) for n in claim["order"]]
            if all(e for _, e in es):
                accs = [m(e, "A_last") for _, e in es]
                # the measured order between neighbours ("<" where the paper's order breaks)
                figures = f"{es[0][0]} {100 * accs[0]:.1f}" + "".join(
                    f" {'≥' if accs[i] >= accs[i + 1] else '<'} {es[i + 1][0]} {100 * accs[i + 1]:.1f}"
                    for i in range(len(accs) - 1))
                ok = all(accs[i] >= accs[i + 1] - claim.get("tolerance", 0.0) for i in range(len(accs) - 1))
                verdict = "holds" if ok else "does not hold"
        elif kind == "growth":  # per-task adapters reach a growing network's accuracy with less growth
            a, b = _get(table, sc, claim["row"]), _get(table, sc, claim["baseline"])
            if a and b:
                def at(e):
                    grown = "" if e["growth_pct"] is None else f" ({e['growth_pct']:+.0f} %)"
                    return f"{_fmt_pct(e['A_last'])} % at {_count(e['stored'])} stored{grown}"
                figures = f"{claim['row']} {at(a)}; {claim['baseline']} {at(b)}"
                verdict = ("holds" if m(a, "A_last") >= m(b, "A_last") - claim.get("tolerance", 0.01)
                           and a["stored"] < b["stored"] else "does not hold")
        elif kind == "not_tested":
            verdict, figures = "not tested here", claim["why"]
        else:
            raise ValueError(f"{proto['path']}: unknown claim kind {kind!r}.")
        out.append(dict(claim=claim["text"], source=claim.get("source", ""), test=claim.get("test", ""),
                        scenario=sc, verdict=verdict, figures=figures, differs=claim.get("differs", "")))
    return out


def write_claims(proto: dict, rows: list[dict], out: Path) -> Path:
    md = ["| claim (source) | test here | verdict | measured | what differs from the paper |", "|---|---|---|---|---|"]
    for c in rows:
        md.append(f"| {c['claim']} ({c['source']}) | {c['test']} ({c['scenario']}) | **{c['verdict']}** | "
                  f"{c['figures'] or '–'} | {c['differs']} |")
    p = out / "claims.md"
    p.write_text("\n".join(md) + "\n")
    return p


BASELINES = ("naive", "ewc", "lwf", "replay", "ncm", "linear_probe", "joint", "growing")


def write_figures(proto: dict, table: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    for scenario, rows in table.items():
        main_rows = {n: e for n, e in rows.items() if e["curve"] and e["row"].get("group") != "rank_sweep"}
        if not main_rows:
            continue
        # one style per row (tab10 alone repeats after ten rows): the baselines dashed with squares, ours solid
        colors = plt.get_cmap("tab20").colors
        fig, ax = plt.subplots(figsize=(9, 4.8))
        for k, (name, e) in enumerate(main_rows.items()):
            if e["row"]["method"] == "joint":
                ax.axhline(100 * _mean(e["A_last"]), ls=":", color="k", label="joint (upper bound)")
                continue
            curve = 100 * np.mean(np.array(e["curve"], dtype=float), axis=0)
            baseline = e["row"]["method"] in BASELINES
            ax.plot(range(1, len(curve) + 1), curve, color=colors[(2 * k) % 20 + (k // 10) % 2],
                    ls="--" if baseline else "-", marker="s" if baseline else "o", ms=4,
                    label=e["row"].get("label", name))
        ax.set(xlabel="experiences learnt", ylabel="average accuracy on seen experiences (%)",
               title=f"{proto['protocol']} {scenario}: accuracy after each experience")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        written.append(out / f"curves_{scenario}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for name, e in main_rows.items():
            if e["stored"]:
                ax.scatter(e["stored"], 100 * _mean(e["A_last"]))
                ax.annotate(e["row"].get("label", name), (e["stored"], 100 * _mean(e["A_last"])), fontsize=7)
        ax.set(xscale="log", xlabel="stored parameters after the last experience", ylabel="last accuracy (%)",
               title=f"{proto['protocol']} {scenario}: accuracy against stored parameters")
        fig.tight_layout()
        written.append(out / f"acc_vs_stored_{scenario}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        ret_rows = {n: e for n, e in rows.items() if e["retention"]}
        if ret_rows:
            fig, ax = plt.subplots(figsize=(6, 4.5))
            for name, e in ret_rows.items():
                x, y = 100 * _mean(e["A_last"]), 100 * _mean(e["retention"])
                ax.scatter(x, y, marker="s" if e["row"].get("group") == "rank_sweep" else "o")
                ax.annotate(e["row"].get("label", name), (x, y), fontsize=7)
            pre = _mean([v for e in ret_rows.values() for v in e["pretraining"]])
            if pre:
                ax.axhline(100 * pre, ls=":", color="k", label="before training")
                ax.axhline(97 * pre, ls="--", color="grey", label="0.97 × before")
                ax.legend(fontsize=7)
            ax.set(xlabel="new-task last accuracy (%)", ylabel="pretraining-task accuracy after the last experience (%)",
                   title=f"{proto['protocol']} {scenario}: retention against new-task accuracy")
            fig.tight_layout()
            written.append(out / f"retention_vs_acc_{scenario}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)

        sweep = [e for e in rows.values() if e["row"].get("sweep") and e["A_last"]]
        if len(sweep) > 1:  # (the sweep's rows are task-IL only; merged LoRA alone is no sweep)
            fig, axes = plt.subplots(1, 2, figsize=(9, 4))
            for conv in sorted({e["row"]["sweep"] for e in sweep}):
                pts = sorted(((e["results"][0]["config"]["r"], e) for e in sweep if e["row"]["sweep"] == conv),
                             key=lambda p: p[0])
                rs = [r for r, _ in pts]
                axes[0].plot(rs, [100 * _mean(e["retention"] or [None]) if e["retention"] else np.nan
                                  for _, e in pts], marker="o", label=conv)
                axes[1].plot(rs, [100 * _mean(e["A_last"]) for _, e in pts], marker="o", label=conv)
            for ax, lab in zip(axes, ("pretraining-task accuracy (%)", "new-task last accuracy (%)")):
                ax.set(xscale="log", xlabel="rank r", ylabel=lab)
                ax.legend(fontsize=8)
            fig.suptitle(f"{proto['protocol']} {scenario}: merged LoRA rank sweep")
            fig.tight_layout()
            written.append(out / f"rank_sweep_{scenario}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written


def _write_selection(proto: dict, results: dict, outs: list[Path], *, write_back: bool) -> None:
    """``selection.md`` in each of ``outs`` (every grid point's validation accuracy) and, unless quick, the chosen
    values at the end of the protocol's YAML. Rows chosen before (not in ``results``) keep their choice and their
    lines."""
    rank = {r["name"]: i for i, r in enumerate(proto.get("all_rows", proto["rows"]))}  # (--only keeps fewer)

    def order(key):  # a row's own choice first, then its per-scenario ones
        name, _, sc = key.partition("@")
        return (rank.get(name, len(rank)), sc)

    new_lines: dict = {}
    on_file = {}
    if write_back:  # choices another suite process (e.g. --only other rows) wrote since this one started
        import yaml

        text = Path(proto["path"]).read_text()
        on_file = (yaml.safe_load(text.split(MARKER)[1]) or {}).get("selected") or {} if MARKER in text else {}
    chosen = {n: v for n, v in {**proto["selected"], **on_file}.items() if n not in results}
    for name, points in results.items():
        best = max(points, key=lambda p: -1 if p[1] is None else p[1])
        chosen[name] = dict(best[0], validation_accuracy=None if best[1] is None else round(best[1], 4))
        for point, acc in points:
            mark = " **chosen**" if point is best[0] else ""
            new_lines.setdefault(name, []).append(
                f"| {name} | {_tag(point)}{mark} | {'diverged' if acc is None else f'{100 * acc:.1f}'} |")
    chosen = dict(sorted(chosen.items(), key=lambda kv: order(kv[0])))
    for out in outs:
        lines = dict(new_lines)
        old = out / "selection.md"
        for line in (old.read_text().splitlines()[2:] if old.exists() else []):
            name = line.split("|")[1].strip()
            if name not in results:
                lines.setdefault(name, []).append(line)
        head = ["| row | grid point | validation last acc % |", "|---|---|---|"]
        body = [ln for n in sorted(lines, key=order) for ln in lines[n]]
        old.write_text("\n".join(head + body) + "\n")
    if write_back:
        import yaml

        path = Path(proto["path"])
        text = path.read_text()
        head = text.split(MARKER)[0].rstrip() + "\n\n"
        block = yaml.safe_dump({"selected": chosen}, sort_keys=False, default_flow_style=None)
        path.write_text(head + MARKER + "\n" + block)
    proto["selected"] = chosen


def _apply_selection(proto: dict, runs: list) -> list:
    """The main runs with each row's chosen values (its own, or ``lr_from``'s lr)."""
    out = []
    for row, scenario, seed, point, opts, run_dir in runs:
        src = row.get("lr_from") or row["name"]
        picked = proto["selected"].get(f"{src}@{scenario}") or proto["selected"].get(src) or {}
        chosen = {k: v for k, v in picked.items() if k != "validation_accuracy"}
        if row.get("lr_from"):
            chosen = {"lr": chosen["lr"]} if "lr" in chosen else {}
        out.append((row, scenario, seed, point, dict(opts, **chosen), run_dir))
    return out


def _extension_dirs(out: Path, records: Records, selection: list) -> list[Path]:
    """The finished selection runs outside the planned grid (its extensions), from the run folders and records."""
    planned = {d for *_, d in selection}
    found = {d for d in out.glob("select/*/*") if d.is_dir()}
    if records.dir:
        found |= {out / p.relative_to(records.dir / "records").with_suffix("")
                  for p in (records.dir / "records").glob("select/*/*.json")}
    return sorted(d for d in found if d not in planned and _done(records.load(d)))


def _wall_time(out: Path, records: Records, selection: list, runs: list) -> float:
    """Compute of the whole protocol: every finished run's own wall time (selection and its extensions included),
    across sessions."""
    dirs = [d for *_, d in selection + runs] + _extension_dirs(out, records, selection)
    return sum((records.load(d) or {}).get("wall_time_s") or 0.0 for d in dirs)


def readme_section(proto: dict, table: dict, claim_rows: list[dict], *, wall_s: float, planned: int,
                   figures: list[Path], figures_link: str) -> str:
    """The protocol's results as Markdown for the README: the command, budget, machine and wall time, a table per
    scenario, the claims table and the ``figures`` (linked as ``figures_link/<name>``)."""
    c = proto["common"]
    results = [r for rows in table.values() for e in rows.values() for r in e["results"]]
    finished = len(results)
    threads = sorted({r["config"].get("threads") for r in results if r.get("config", {}).get("threads")})
    lines = [
        f"#### {proto['title']}",
        "",
        f"`python -m experiments.suite --protocol {proto['protocol']}` (then `--report --readme README.md` rewrites "
        f"this block). Budget per experience: {c.get('subset')} training images, {c.get('epochs')} epochs, batch "
        f"{c.get('batch_size')}, {c.get('eval_subset')} test images; seeds {', '.join(map(str, proto['seeds']))}"
        + (f"; {'/'.join(map(str, threads))} torch thread(s) per run" if threads else "") + ". "
        f"Wall time of all its runs (learning-rate selection included), each run's own time summed: "
        f"{wall_s / 3600:.1f} h"
        + ("." if finished >= planned else f"; {finished} of {planned} main runs finished so far."),
        "",
    ]
    names = {"class_il": "class-incremental (no task label at test time)",
             "task_il": "task-incremental (task label given, one head per task)"}
    for scenario in (s for s in proto["scenarios"] if s in table):
        lines += [f"**{proto['protocol'].upper()}, {names[scenario]}**", ""]
        md = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        md += ["| " + " | ".join(r) + " |" for r in _table_rows(proto, table[scenario])]
        lines += md + [""]
    lines += [f"**{proto['protocol'].upper()}, the papers' claims**", "",
              "| claim (source) | test here | verdict | measured | what differs from the paper |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['claim']} ({r['source']}) | {r['test']} ({r['scenario']}) | **{r['verdict']}** | "
              f"{r['figures'] or '–'} | {r['differs']} |" for r in claim_rows]
    lines.append("")
    for png in figures:
        lines.append(f"![{png.stem}]({figures_link}/{png.name})")
    return "\n".join(lines).rstrip() + "\n"


def write_readme(path: Path, protocol: str, section: str) -> None:
    """Replace the README block between ``<!-- suite:<protocol> -->`` and ``<!-- /suite:<protocol> -->``."""
    text = path.read_text()
    begin, end = f"<!-- suite:{protocol} -->", f"<!-- /suite:{protocol} -->"
    if begin not in text or end not in text or text.index(end) < text.index(begin):
        raise ValueError(f"--readme: {path} has no {begin} ... {end} block; add the two lines where the results go.")
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + section + end + rest.split(end, 1)[1])


def _describe(res: dict | None) -> str:
    if not res:
        return "no result"
    if res.get("stopped"):
        return f"diverged at experience {res['stopped'].get('experience')}"
    txt = f"last {100 * res['A_last']:.1f} %"
    if res.get("average_forgetting") is not None:
        txt += f", forgetting {100 * res['average_forgetting']:.1f}"
    if res.get("pretraining_retention"):
        txt += f", retention {100 * res['pretraining_retention'][-1]:.1f} %"
    return txt + f" ({res.get('wall_time_s', 0):.0f} s)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", required=True, help="q1, q2 (experiments/configs/suite/<name>.yaml) or a YAML path")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated (default: the "
                                                                                     "protocol's)")
    p.add_argument("--quick", action="store_true", help="a few images per run, one seed: the smoke test")
    p.add_argument("--out", help="output folder (default runs/suite-<protocol>[-quick])")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run (default 2)")
    p.add_argument("--only", help="comma-separated row names (default: all)")
    p.add_argument("--reselect", action="store_true", help="choose the learning rates again even if the protocol has "
                                                          "them")
    p.add_argument("--status", action="store_true", help="print how many runs are finished, run nothing")
    p.add_argument("--report", action="store_true", help="rewrite the tables, claims and figures from the finished "
                                                         "runs (folders and records), run nothing")
    p.add_argument("--readme", help="with --report: also rewrite this README's block between <!-- suite:<protocol> "
                                    "--> and <!-- /suite:<protocol> --> (command, budget, machine, wall time, "
                                    "tables, claims, figures)")
    p.add_argument("--records", help="folder of the published results: compact records of finished runs (skipped "
                                     "by a later command, even in a fresh clone), tables, claims, figures (default "
                                     "docs/results/<protocol>; none with --quick); 'none' for no records")
    a = p.parse_args(argv)
    try:
        proto = load_protocol(a.protocol)
        if a.only:
            keep = set(a.only.split(","))
            unknown = keep - {r["name"] for r in proto["rows"]}
            if unknown:
                raise ValueError(f"--only: no row(s) {sorted(unknown)} in {proto['path']}.")
            proto["all_rows"] = proto["rows"]
            proto["rows"] = [r for r in proto["rows"] if r["name"] in keep]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.readme:  # checked before anything runs
        text = Path(a.readme).read_text() if Path(a.readme).is_file() else None
        block = f"<!-- suite:{proto['protocol']} -->"
        if not a.report or a.quick or a.only or text is None or block not in text or f"<!-- /{block[5:]}" not in text:
            print(f"error: --readme needs --report (the whole protocol: no --quick, no --only) and an existing file "
                  f"with the lines {block} and <!-- /{block[5:]} where the results go.", file=sys.stderr)
            return 2
    seeds = a.seeds or (proto["seeds"][:1] if a.quick else proto["seeds"])
    out = Path(a.out or f"runs/suite-{proto['protocol']}{'-quick' if a.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    if a.records is None:
        a.records = "none" if a.quick else str(Path(__file__).resolve().parent.parent / "docs" / "results"
                                               / proto["protocol"])
    records = Records(out, None if a.records == "none" else Path(a.records))
    published = [out] + ([records.dir] if records.dir else [])
    for d in published:
        d.mkdir(parents=True, exist_ok=True)
    selection, runs = plan(proto, quick=a.quick, seeds=seeds, out=out)
    if a.status:
        done = lambda items: sum(_done(records.load(d)) for *_, d in items)  # noqa: E731
        extra = _extension_dirs(out, records, selection)
        print(f"{proto['protocol']} in {out}: selection {done(selection)}/{len(selection)} grid runs finished "
              f"(+{len(extra)} extension runs), {len(proto['selected'])} rows chosen; main runs "
              f"{done(runs)}/{len(runs)} finished")
        return 0
    if a.report:
        table = aggregate(proto, _apply_selection(proto, runs), records)
        for d in published:
            write_tables(proto, table, d)
            write_claims(proto, claims(proto, table), d)
            figures = write_figures(proto, table, d)
        if a.readme:
            readme = Path(a.readme)
            link = Path(os.path.relpath(published[-1].resolve(), readme.resolve().parent)).as_posix()
            write_readme(readme, proto["protocol"], readme_section(
                proto, table, claims(proto, table), wall_s=_wall_time(out, records, selection, runs),
                planned=len(runs), figures=figures, figures_link=link))
            print(f"results of {proto['protocol']} written into {readme}")
        done = sum(len(e["seeds"]) for rows in table.values() for e in rows.values())
        print(f"tables, claims and figures over {done}/{len(runs)} finished main runs in "
              f"{', '.join(map(str, published))}")
        return 0
    t0 = time.time()
    try:
        # 1. learning rates on the validation split (skipped for rows the protocol already has, unless --reselect);
        # a best lr at an end of the grid extends the grid by a factor of 3 that way (at most twice)
        todo = [s for s in selection if a.quick or a.reselect or s[0]["key"] not in proto["selected"]]
        by_row: dict = {}
        k = 0
        for name in dict.fromkeys(s[0]["key"] for s in todo):
            entries = [s for s in todo if s[0]["key"] == name]
            row, scenario, seed, _, opts0, _ = entries[0]
            extensions = 0
            while entries:
                for row, scenario, seed, point, opts, run_dir in entries:
                    k += 1
                    res, how = run_one(opts, run_dir, threads=a.threads, in_process=a.quick, records=records)
                    acc = res["A_last"] if res and res.get("finished") else None
                    by_row.setdefault(name, []).append((point, acc))
                    print(f"[select {k}] {proto['protocol']} {name} {_tag(point)}: validation {_describe(res)} "
                          f"[{how}]", flush=True)
                entries = []
                new_lr = _extend(by_row[name], proto["selection"].get("max_extensions", 2) - extensions)
                if new_lr is not None and not a.quick:
                    extensions += 1
                    best = max(by_row[name], key=lambda p: -1 if p[1] is None else p[1])[0]
                    point = dict(best, lr=new_lr)
                    opts = dict(opts0, **point)
                    entries = [(row, scenario, seed, point, opts, run_dir.parent / _tag(point))]
        if by_row:
            _write_selection(proto, by_row, published, write_back=not a.quick)
        runs = _apply_selection(proto, runs)
        # 2. every row, seed and scenario; tables, claims and figures rewritten after each run
        for k, (row, scenario, seed, _, opts, run_dir) in enumerate(runs, 1):
            res, how = run_one(opts, run_dir, threads=a.threads, in_process=a.quick, records=records)
            print(f"[{k}/{len(runs)}] {proto['protocol']} {scenario} {row['name']} seed {seed}: {_describe(res)} "
                  f"[{how}]", flush=True)
            if how != "done before" or k == len(runs):
                table = aggregate(proto, runs, records)
                for d in published:
                    write_tables(proto, table, d)
                    write_claims(proto, claims(proto, table), d)
                    write_figures(proto, table, d)
    except KeyboardInterrupt:
        print(f"interrupted: finished runs are kept in {out}; the same command continues.", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in published:
        (d / "summary.json").write_text(json.dumps(dict(
            protocol=proto["protocol"], seeds=seeds, quick=a.quick, runs=len(selection) + len(runs),
            runs_wall_time_s=round(_wall_time(out, records, selection, runs), 1),
            this_command_s=round(time.time() - t0, 1),
            selected=proto["selected"], machine=dict(cpu_count=os.cpu_count(), threads=a.threads)), indent=2))
    print(f"tables, claims and figures in {', '.join(map(str, published))} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
