"""Speed and memory of LoRA against full fine-tuning and HF PEFT's LoRA, on three models.

    python -m experiments.bench_speed                 # full table (a few minutes on 2 CPU cores)
    python -m experiments.bench_speed --quick         # smoke run

Models (batch 64, 32×32 inputs, r = 8, alpha = 8, no dropout): a ViT (12 blocks, width 192, patch 4; LoRA on qkv,
proj, fc1, fc2), a ResNet-18 with a CIFAR stem (3×3 conv1, no max-pool; LoRA on every 3×3 conv of the stages) and
the CIFAR ResNet-32 (LoRA on every 3×3 conv of the stages). A training step is forward, cross-entropy, backward and
an SGD step over the trainable parameters (LoRA: adapters and head). Times are medians over interleaved
repetitions in one process (the machine is noisy: compare ratios, not absolute times). "Frozen floor" is a step
of the backbone with every weight frozen but the head and the backward pass run through every layer (input
gradients): what any method with adapters in every block pays before its adapters do any work. Peak memory is what
three training steps add to a freshly built model's resident memory, sampled in a separate process per variant; the
second table counts exactly the activations saved for the backward pass and the gradients of what trains. PEFT
(``pip install peft``, a benchmark-only dependency) is optional.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

__all__ = ["build", "main", "MODELS"]

MODELS = ("vit", "resnet18", "resnet32")
R = 8


def _base(name: str, quick: bool) -> tuple[nn.Module, object]:
    from models import cifar_resnet, vit_cifar

    if name == "vit":
        depth = 2 if quick else 12
        return vit_cifar(10, depth=depth, embed_dim=192, num_heads=3), ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    if name == "resnet18":
        import torchvision

        m = torchvision.models.resnet18(num_classes=10)
        m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
        return m, r"layer\d\.\d+\.conv[12]"
    if name == "resnet32":
        return cifar_resnet(20 if quick else 32, 10), r"layer\d\.\d+\.conv[12]"
    raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")


def build(name: str, variant: str, quick: bool = False) -> nn.Module:
    """``variant``: ``full`` (every weight trains), ``ours`` (LoRA, unmerged), ``unfused`` (ours through autograd's
    base and low-rank passes instead of the fused functions of ``models.lora``), ``merged`` (ours merged and
    unloaded), ``peft`` (PEFT LoRA, head trainable), ``frozen`` (only the head trains; timed with input gradients,
    see :func:`_step_fn`)."""
    from models import add_lora, merge_and_unload

    torch.manual_seed(0)
    model, targets = _base(name, quick)
    if variant == "full":
        return model
    if variant == "frozen":  # nothing but the head trains: with input gradients, the floor of any adapter method
        from models import find_head

        for p in model.parameters():
            p.requires_grad_(False)
        for p in find_head(model)[1].parameters():
            p.requires_grad_(True)
        return model
    if variant in ("ours", "merged", "unfused"):
        add_lora(model, targets, r=R, alpha=R)
        if variant == "merged":
            model = merge_and_unload(model)
        if variant == "unfused":  # what the fused functions replace: base pass + low-rank passes under autograd
            import types

            from models import lora_layers
            from models.lora import LoRALayer

            for _, m in lora_layers(model):
                if getattr(m, "conv_mode", None) != "loralib":
                    m._train_forward = types.MethodType(LoRALayer._train_forward, m)
        return model
    if variant == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        from models import find_head

        model = inject_adapter_in_model(LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=targets), model)
        for p in find_head(model)[1].parameters():  # PEFT freezes the head too
            p.requires_grad_(True)
        return model
    raise ValueError(f"Unknown variant {variant!r}.")


def _step_fn(model, batch, input_grad: bool = False):
    """One training step. ``input_grad``: the input requires a gradient, so the backward pass runs through every
    frozen layer as it must for adapters in every block (a frozen model alone would stop at the head)."""
    x, y = batch
    if input_grad:
        x = x.clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _infer_fn(model, batch):
    x, _ = batch
    model.eval()

    def infer():
        with torch.no_grad():
            model(x)

    return infer


def saved_activation_mb(model, batch) -> float:
    """Tensors the forward pass saves for the backward pass (distinct storages), MB: the activation memory of a
    training step, measured exactly (unlike the resident-memory peak)."""
    x, _ = batch
    model.train()
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values()) / 2 ** 20


def _time(fn, n: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


_PROBE = """
import sys, threading, time
import psutil, torch
sys.path.insert(0, ".")
torch.set_num_threads(2)
from experiments.bench_speed import build, _step_fn
model = build({name!r}, {variant!r}, {quick})
step = _step_fn(model, (torch.randn({batch}, 3, 32, 32), torch.randint(0, 10, ({batch},))))
proc = psutil.Process()
base = proc.memory_info().rss
peak, done = [base], [False]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.0005)
t = threading.Thread(target=watch)
t.start()
for _ in range(3):
    step()
done[0] = True
t.join()
print((peak[0] - base) / 2 ** 20)
"""


def _peak_train_mb(name: str, variant: str, batch: int, quick: bool) -> float | None:
    """Peak memory a few training steps add on top of the built model (RSS sampled in a fresh process), MB."""
    code = _PROBE.format(name=name, variant=variant, batch=batch, quick=quick)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--steps", type=int, default=3, help="steps timed per repetition")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small models, one repetition: a smoke run")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.steps, args.batch_size = 1, 1, 8
    torch.set_num_threads(args.threads)
    try:
        import peft  # noqa: F401

        have_peft = True
    except ImportError:
        have_peft = False
    variants = ["full", "frozen", "ours", "unfused", "merged"] + (["peft"] if have_peft else [])
    batch = (torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,)))
    rows = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        models = {v: build(name, v, args.quick) for v in variants}
        train = {v: _step_fn(models[v], batch, input_grad=v == "frozen") for v in variants if v != "merged"}
        infer = {v: _infer_fn(models[v], batch) for v in variants if v not in ("frozen", "unfused")}
        infer["base"] = _infer_fn(models["full"], batch)
        t_train = {v: [] for v in train}
        t_infer = {v: [] for v in infer}
        for rep in range(args.reps):
            jobs = [("train", v) for v in train] + [("infer", v) for v in infer]
            random.Random(rep).shuffle(jobs)
            for kind, v in jobs:
                if kind == "train":
                    t_train[v].append(_time(train[v], args.steps))
                else:
                    t_infer[v].append(_time(infer[v], args.steps))
        med = lambda xs: statistics.median(xs)  # noqa: E731
        row = dict(full_step=med(t_train["full"]), ours_step=med(t_train["ours"]), base_infer=med(t_infer["base"]),
                   ours_infer=med(t_infer["ours"]), merged_infer=med(t_infer["merged"]),
                   frozen_step=med(t_train["frozen"]), unfused_step=med(t_train["unfused"]))
        # memory a step needs: activations saved for backward + gradients and SGD state of what trains
        for v in ("full", "ours"):
            grads = sum(p.numel() * p.element_size() for p in models[v].parameters() if p.requires_grad) / 2 ** 20
            row[f"{v}_saved_mb"] = saved_activation_mb(models[v], batch)
            row[f"{v}_grad_mb"] = grads
        if have_peft:
            row.update(peft_step=med(t_train["peft"]), peft_infer=med(t_infer["peft"]))
        if not args.no_memory and not (args.quick and rows):  # quick: one model's memory is enough
            for v in ("full", "ours"):
                row[f"{v}_peak_mb"] = _peak_train_mb(name, v, args.batch_size, args.quick)
        rows[name] = row

    print(f"batch {args.batch_size}, r={R}, {args.threads} threads, medians of {args.reps} interleaved repetitions"
          f"{' (quick: small models)' if args.quick else ''}; times in ms")
    head = ["model", "full step", "frozen floor", "ours step", "ours / floor", "unfused / floor", "ours / full"]
    if have_peft:
        head += ["PEFT step", "PEFT / floor"]
    head += ["base infer", "ours unmerged / base", "ours merged / base"]
    if have_peft:
        head += ["PEFT unmerged / base"]
    if not args.no_memory:
        head += ["train MB full", "train MB ours", "ours / full mem"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        floor = r["frozen_step"]
        cells = [name, f"{1e3 * r['full_step']:.1f}", f"{1e3 * floor:.1f}", f"{1e3 * r['ours_step']:.1f}",
                 f"{r['ours_step'] / floor:.2f}", f"{r['unfused_step'] / floor:.2f}",
                 f"{r['ours_step'] / r['full_step']:.2f}"]
        if have_peft:
            cells += [f"{1e3 * r['peft_step']:.1f}", f"{r['peft_step'] / floor:.2f}"]
        cells += [f"{1e3 * r['base_infer']:.1f}", f"{r['ours_infer'] / r['base_infer']:.2f}",
                  f"{r['merged_infer'] / r['base_infer']:.2f}"]
        if have_peft:
            cells += [f"{r['peft_infer'] / r['base_infer']:.2f}"]
        if not args.no_memory:
            f, o = r.get("full_peak_mb"), r.get("ours_peak_mb")
            cells += [f"{f:.0f}" if f else "-", f"{o:.0f}" if o else "-", f"{o / f:.2f}" if f and o else "-"]
        print("| " + " | ".join(cells) + " |")
    print("\nactivations saved for backward (exact) and gradients of what trains, MB")
    print("| model | saved full | saved ours | grads full | grads ours | (saved + grads) ours / full |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        f_, o_ = r["full_saved_mb"] + r["full_grad_mb"], r["ours_saved_mb"] + r["ours_grad_mb"]
        print(f"| {name} | {r['full_saved_mb']:.0f} | {r['ours_saved_mb']:.0f} | {r['full_grad_mb']:.1f} | "
              f"{r['ours_grad_mb']:.1f} | {o_ / f_:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
