"""Training time of every method relative to merged LoRA (per step and whole run), in one process, interleaved.

    python -m experiments.bench_methods --backbone cifar_resnet32 --r 4 --batch-size 32

Times on a shared machine are noisy, so each method trains the same number of iterations on each of several
experiences, in a shuffled order per round, and the table gives medians of single iterations (forward, backward,
optimizer step and the method's per-step hooks) and their ratio to merged LoRA's. A method's once-per-experience
work (InfLoRA's covariance passes, EBLoRA's gradient passes and SVDs, CoDyRA's prune-and-merge) is timed separately
as "per experience", and the whole run (every experience's ``strategy.train``, all of it) against merged LoRA's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "bench"]


def bench(methods, *, backbone="cifar_resnet32", weights=None, r=4, batch_size=32, iters=10, rounds=4,
          threads=None, seed=0, lr=0.01):
    import torch
    from avalanche.core import SupervisedPlugin
    from avalanche.training.plugins import EvaluationPlugin

    from experiments.benchmarks import arrays_benchmark
    from experiments.run import DEFAULTS, build_model, build_strategy

    if threads:
        torch.set_num_threads(threads)

    class StepTimer(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.steps, self.exp_times, self.totals, self._t = [], [], [], 0.0

        def before_training_iteration(self, strategy, **kw):
            self._t = time.perf_counter()

        def after_training_iteration(self, strategy, **kw):
            if strategy.clock.train_exp_iterations > 0:  # the first iteration of an experience warms caches up
                self.steps.append(time.perf_counter() - self._t)

    n_classes = 2 * rounds
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), iters * batch_size // 2)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.npz"
        one_per_class = np.searchsorted(y, np.arange(n_classes))
        np.savez(path, x_train=x, y_train=y, x_test=x[one_per_class], y_test=y[one_per_class])
        bm = arrays_benchmark(path, rounds, seed=seed, normalization=((0.5,) * 3, (0.25,) * 3))

    from experiments.run import REGISTRY
    from strategies.registry import method_options

    runs = {}
    for m in methods:
        rank = r if "r" in method_options(REGISTRY[m]) else None  # the baselines have no adapter rank
        cfg = dict(DEFAULTS, method=m, backbone=backbone, backbone_weights=weights, r=rank, lr=lr,
                   batch_size=batch_size, seed=seed)
        torch.manual_seed(seed)
        model = build_model(cfg, n_classes, 2)
        timer = StepTimer()
        strategy = build_strategy(cfg, model, dict(
            criterion=torch.nn.CrossEntropyLoss(), train_mb_size=batch_size, train_epochs=1,
            eval_mb_size=batch_size, device="cpu", plugins=[timer], evaluator=EvaluationPlugin(loggers=[])))
        runs[m] = (strategy, timer)
    for exp in bm.train_stream:
        order = list(methods)
        random.Random(seed + exp.current_experience).shuffle(order)
        for m in order:
            strategy, timer = runs[m]
            t0 = time.perf_counter()
            strategy.train(exp)
            total = time.perf_counter() - t0
            timer.totals.append(total)
            timer.exp_times.append(total - sum(timer.steps[-(iters - 1):]))
    out = {}
    for m, (_, timer) in runs.items():
        out[m] = dict(step=statistics.median(timer.steps), per_experience=statistics.median(timer.exp_times),
                      whole=sum(timer.totals), n_steps=len(timer.steps))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_methods", description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="merge_lora,per_task_lora,codyra,eblora,inflora,sd_lora,o_lora,naive")
    ap.add_argument("--backbone", default="cifar_resnet32")
    ap.add_argument("--backbone-weights", default=None)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10, help="iterations per experience")
    ap.add_argument("--rounds", type=int, default=4, help="experiences (each method trains each once)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "merge_lora" not in methods:
        methods.insert(0, "merge_lora")
    res = bench(methods, backbone=args.backbone, weights=args.backbone_weights, r=args.r,
                batch_size=args.batch_size, iters=args.iters, rounds=args.rounds, threads=args.threads)
    ref, ref_whole = res["merge_lora"]["step"], res["merge_lora"]["whole"]
    print(f"backbone {args.backbone}, r={args.r}, batch {args.batch_size}, {args.rounds} experiences x "
          f"{args.iters} iterations per method, interleaved; medians")
    print("| method | step ms | step / merge_lora | per-experience overhead s | whole run s | whole run / merge_lora |")
    print("|---|---|---|---|---|---|")
    for m, v in res.items():
        print(f"| {m} | {1000 * v['step']:.1f} | {v['step'] / ref:.2f} | {v['per_experience']:.2f} | "
              f"{v['whole']:.1f} | {v['whole'] / ref_whole:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
