"""Run one continual-learning experiment and write its results as it goes.

    python -m experiments.run --config experiments/configs/default.yaml
    python -m experiments.run --benchmark split_cifar10 --method merge_lora --backbone cifar_resnet32 \
        --backbone-weights pretrained --epochs 1 --subset 1000 --out runs/merge

Options come from the defaults below, then ``--config`` (YAML, keys as the option names with ``_``), then the
command line. ``<out>/results.json`` is rewritten after every experience (config, class order, accuracy matrix,
average accuracy, forgetting, parameter counts, times, ranks, spectra) and so is ``<out>/checkpoint.pt`` (for
``--resume``); ``<out>/log.txt``, ``<out>/csv/``, ``<out>/tb/`` and ``<out>/metrics.csv`` hold the text, CSV,
TensorBoard and all-metrics logs. Under ``torchrun`` the run is distributed (DDP) and rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["main", "parse_config", "resolve_method", "run", "evaluate_checkpoint", "METHODS", "BENCHMARKS",
           "DEFAULTS", "TRAINING_OPTIONS"]

# third-party import-time noise (Avalanche's optional solvers) that users read as errors; our own warnings stay
warnings.filterwarnings("ignore", message="no QP solver found")
warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from strategies.recipe import LR_SCHEDULES, OPTIMIZERS, SCHEDULE_STEPS  # noqa: E402
from strategies.registry import LORA_OPTIONS, method_options, method_registry  # noqa: E402

REGISTRY = method_registry()
METHODS = tuple(REGISTRY)
BENCHMARKS = ("split_cifar10", "split_cifar100", "arrays")
# the options of every method, by name: {option: {method: MethodOption}}
_METHOD_OPTIONS: dict = {}
for _name, _cls in REGISTRY.items():
    for _opt in method_options(_cls).values():
        _METHOD_OPTIONS.setdefault(_opt.name, {})[_name] = _opt
# the CLI fills these from the run's set-up; they are not user options
_DERIVED = ("trainable_modules", "class_incremental")
# training options: None means the method's recipe (strategies.recipe.TrainingRecipe)
TRAINING_OPTIONS = ("optimizer", "lr", "momentum", "weight_decay", "betas", "lr_schedule", "warmup", "schedule_step")

DEFAULTS = dict(
    benchmark="split_cifar10",
    n_experiences=None,  # 5 for split_cifar10 and arrays, 10 for split_cifar100
    data=None,
    dataset_root=None,
    task_incremental=False,
    seed=0,
    subset=None,
    eval_subset=None,
    validation=None,
    image_size=None,
    backbone="cifar_resnet32",
    backbone_weights=None,
    keep_head=False,
    normalization=None,  # None: what the weights expect (else the data's own statistics)
    tf_same_padding=False,
    method="merge_lora",
    target_modules="auto",
    per_task_bn=False,
    bn="auto",
    epochs=1,
    batch_size=64,
    eval_batch_size=256,
    keep_optimizer_state=False,
    eval_on="seen",
    device="cpu",
    threads=None,
    num_workers=0,
    out=None,
    progress=True,
    resume=False,
    retention_data=None,
    retention_subset=None,
    replay=None,
    wandb=None,
    **{k: None for k in TRAINING_OPTIONS},
    **{k: None for k in _METHOD_OPTIONS if k not in ("target_modules", "per_task_bn") + _DERIVED},
)

_CHOICES = dict(
    benchmark=BENCHMARKS, method=METHODS, bn=("auto", "train", "frozen"), optimizer=(None,) + OPTIMIZERS,
    lr_schedule=(None,) + LR_SCHEDULES, schedule_step=(None,) + SCHEDULE_STEPS, eval_on=("seen", "all"),
)
_HAND_WRITTEN = LORA_OPTIONS + ("per_task_bn",)  # options with a flag of their own below


def _method_flag_help(name: str, text: str | None = None) -> str:
    """Help of a method option: its methods, its text (the docstring's, reST roles dropped), each method's
    default."""
    owners = _METHOD_OPTIONS[name]
    if text is None:
        text = next((o.help for o in owners.values() if o.help), "")
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
    defaults = {m: o.default for m, o in owners.items()}
    if len(set(map(repr, defaults.values()))) == 1:
        dflt = f"default {next(iter(defaults.values()))}"
    else:
        dflt = "default " + ", ".join(f"{m} {v}" for m, v in defaults.items())
    return f"{', '.join(owners)}: {text} ({dflt})".replace("%", "%%")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Continual learning with low-rank adaptation on Avalanche: one run, results in --out. Every "
                    "method option and training option left unset takes the method's own default (its official "
                    "code's), so '--method inflora' alone runs InfLoRA as its authors do.",
        argument_default=argparse.SUPPRESS,  # so only flags given on the command line override the config file
    )
    add = p.add_argument
    add("--config", help="YAML file of options (keys = option names with '_'); command-line flags override it")
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", choices=BENCHMARKS, help="default split_cifar10")
    g.add_argument("--n-experiences", type=int, help="default 5 (10 for split_cifar100)")
    g.add_argument("--data", help="arrays .npz file or ImageFolder dir (default: $LOWRANK_CL_DATA/<dataset>.npz, "
                                  "else download); required for --benchmark arrays")
    g.add_argument("--dataset-root", help="where Avalanche downloads CIFAR when no offline source is found")
    g.add_argument("--task-incremental", action="store_true", help="task labels and one head per task")
    g.add_argument("--class-incremental", dest="task_incremental", action="store_false",
                   help="no task labels, one head (the default; overrides a config's task_incremental)")
    g.add_argument("--seed", type=int, help="class order and initialisation (default 0)")
    g.add_argument("--subset", type=int, help="training images per experience (quick runs)")
    g.add_argument("--eval-subset", type=int, help="test images per experience (quick runs)")
    g.add_argument("--validation", type=int, metavar="N",
                   help="hold out N training images per experience (disjoint from the training images) and evaluate "
                        "on them instead of the test set: for choosing hyper-parameters")
    g.add_argument("--image-size", type=int, help="resize images (e.g. 224 for ImageNet backbones)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="cifar_resnet20|32|44|56, vit_cifar, timm:<name>, torchvision:<name>, "
                                      "pytorchcv:<name>")
    g.add_argument("--backbone-weights", help="checkpoint file, or 'pretrained' (the library's weights; downloads)")
    g.add_argument("--keep-head", action="store_true", help="keep a pretrained head of the right size (class-IL)")
    g.add_argument("--normalization", help="input normalisation: imagenet, cifar10, half ((x-0.5)/0.5), MEAN,STD or "
                                           "M1,M2,M3,S1,S2,S3 (default: what the weights expect, else the data's)")
    g.add_argument("--tf-same-padding", action="store_true",
                   help="TensorFlow 'SAME' padding on stride-2 convs, for weights trained in TF (e.g. the shared "
                        "MobileNetV2)")
    g.add_argument("--bn", choices=_CHOICES["bn"],
                   help="BatchNorm while training: frozen (eval mode, fixed) or train; auto = frozen with weights")
    g = p.add_argument_group("method (LoRA options: each method's own default when unset)")
    g.add_argument("--method", choices=METHODS, help="default merge_lora; naive = fine-tuning of every weight")
    g.add_argument("--r", "--lora-r", dest="r", type=int,
                   help=_method_flag_help("r", "LoRA rank")
                   + "; under torchrun write --lora-r (torchrun reads --r as --rdzv-*)")
    g.add_argument("--alpha", type=float, help=_method_flag_help("alpha", "LoRA alpha, scale alpha/r (None: the "
                                                                          "method's rule, e.g. 2r for merge_lora)"))
    g.add_argument("--rslora", action=argparse.BooleanOptionalAction, help="scale alpha/sqrt(r)")
    g.add_argument("--dropout", type=float, help=_method_flag_help("dropout", "LoRA input dropout"))
    g.add_argument("--conv-mode", choices=("kxk_1x1", "loralib"),
                   help=_method_flag_help("conv_mode", "conv LoRA shape"))
    g.add_argument("--target-modules", help="'auto', a regex (full match) or comma-separated name suffixes")
    g.add_argument("--exclude-modules", help="regex or comma-separated suffixes never adapted")
    g.add_argument("--per-task-bn", action="store_true", help="per_task_lora: a BatchNorm copy per task")
    g = p.add_argument_group("method options (generated from each strategy's signature and docstring)")
    for name in sorted(_METHOD_OPTIONS):
        if name in _HAND_WRITTEN or name in _DERIVED:
            continue
        opt = next(iter(_METHOD_OPTIONS[name].values()))
        flag = "--" + name.replace("_", "-")
        if opt.type is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, help=_method_flag_help(name))
        elif opt.type is not None:
            g.add_argument(flag, type=opt.type, choices=opt.choices, help=_method_flag_help(name))
    g = p.add_argument_group("training (optimizer, learning rate and schedule: the method's recipe when unset)")
    g.add_argument("--epochs", type=int, help="default 1")
    g.add_argument("--batch-size", type=int, help="default 64")
    g.add_argument("--eval-batch-size", type=int, help="default 256")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, help="learning rate (hide_lora: before its batch/256 scaling)")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--betas", type=lambda v: [float(b) for b in v.split(",")], help="Adam betas, e.g. 0.9,0.999")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="restarted every experience")
    g.add_argument("--warmup", type=float, help="share of each experience's steps in linear warm-up")
    g.add_argument("--schedule-step", choices=SCHEDULE_STEPS, help="the schedule advances per iteration or epoch")
    g.add_argument("--replay", type=int, metavar="N",
                   help="add experience replay with a memory of N samples (Avalanche's ReplayPlugin) to the method")
    g.add_argument("--keep-optimizer-state", action="store_true",
                   help="carry the optimizer state across experiences (Avalanche's way; default: a fresh state "
                        "per experience, as every official method)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-on", choices=_CHOICES["eval_on"],
                   help="test experiences evaluated after each experience: seen (default) or all")
    g.add_argument("--device", help="cpu (default), cuda, cuda:N or auto")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--num-workers", type=int, help="data-loader workers (default 0)")
    g.add_argument("--out", help="output directory (default runs/<method>-<backbone>-seed<seed>)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no interactive progress bars")
    g.add_argument("--retention-data", help="arrays .npz of the pretraining task: accuracy on its test split through "
                                            "the backbone's original head after every experience (needs weights)")
    g.add_argument("--retention-subset", type=int, help="use this many retention test images (balanced)")
    g.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (Avalanche's WandBLogger; "
                                                      "WANDB_MODE=offline works without the internet)")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt (written after every experience) with the same options")
    return p


def resolve_method(cfg: dict) -> tuple:
    """``(strategy class, {option: value}, recipe)`` of ``cfg["method"]``: the options the user set, else the
    method's own defaults; the training recipe with the user's training options over the method's. Raises
    ``ValueError`` naming an option set for a method that does not have it."""
    method = cfg["method"]
    if method not in REGISTRY:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    cls = REGISTRY[method]
    opts = method_options(cls)
    for key, owners in _METHOD_OPTIONS.items():
        if key in _DERIVED or key == "target_modules" or key not in cfg:
            continue
        unset = cfg[key] is None or (key == "per_task_bn" and cfg[key] is False)
        if key == "masked_loss" and getattr(cls, "always_masked", False):
            if cfg[key] is False:
                raise ValueError(f"{method} always trains with the masked loss (its official code masks whatever "
                                 "the flag says); drop --no-masked-loss.")
            continue
        if not unset and key not in opts:
            raise ValueError(f"--{key.replace('_', '-')} is not an option of {method} (it is one of "
                             f"{', '.join(owners)}); drop it or pick one of those methods.")
    kwargs = {k: (cfg[k] if cfg.get(k) is not None else o.default) for k, o in opts.items() if k not in _DERIVED}
    if "target_modules" in opts:
        kwargs["target_modules"] = cfg["target_modules"]
    if "trainable_modules" in opts:
        kwargs["trainable_modules"] = r"head" if cfg["task_incremental"] else "auto"
    recipe = cls.recipe.with_overrides(**{k: cfg.get(k) for k in TRAINING_OPTIONS})
    return cls, kwargs, recipe


# option: (kind, low, high); "frac" is [low, high), the others have no upper bound; None means unset (not checked)
_RANGES = dict(
    epochs=("int", 1, None), batch_size=("int", 1, None), eval_batch_size=("int", 1, None),
    n_experiences=("int", 1, None), image_size=("int", 1, None), threads=("int", 1, None),
    num_workers=("int", 0, None), subset=("int", 1, None), eval_subset=("int", 1, None),
    retention_subset=("int", 1, None), validation=("int", 1, None), replay=("int", 1, None), seed=("int", 0, None), r=("int", 1, None), alpha=("pos", 0, None),
    dropout=("frac", 0, 1), lr=("pos", 0, None), momentum=("float", 0, None), weight_decay=("float", 0, None),
    warmup=("frac", 0, 1),
)


def _check_ranges(cfg: dict) -> None:
    """Every numeric option in its range, and the module patterns and output path usable, before any work."""
    for key, (kind, low, high) in _RANGES.items():
        v = cfg.get(key)
        if v is None:
            continue
        flag = "--" + key.replace("_", "-")
        if kind == "int" and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise ValueError(f"{flag} must be an integer >= {low}, got {v!r}.")
        if kind != "int" and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ValueError(f"{flag} must be a number, got {v!r}.")
        if kind == "pos" and not v > low:
            raise ValueError(f"{flag} must be > {low}, got {v!r}.")
        if kind == "float" and v < low:
            raise ValueError(f"{flag} must be >= {low}, got {v!r}.")
        if kind == "frac" and not low <= v < high:
            raise ValueError(f"{flag} must be in [{low}, {high}), got {v!r}.")
    betas = cfg.get("betas")
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        raise ValueError(f"--betas must be two numbers in [0, 1), e.g. 0.9,0.999; got {betas!r}.")
    for key in ("target_modules", "exclude_modules"):
        spec = cfg.get(key)
        if isinstance(spec, str) and spec != "auto" and "," not in spec:
            try:
                re.compile(spec)
            except re.error as e:
                raise ValueError(f"--{key.replace('_', '-')} {spec!r} is not a valid regular expression ({e}); give "
                                 "a regex (full match on the module name), comma-separated name suffixes or 'auto'.")
    out = cfg.get("out")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is an existing file; give a directory for the run's outputs.")


def parse_config(argv=None) -> dict:
    """Defaults, then the YAML file, then command-line flags; method and training options left unset take the
    method's defaults (written back into the returned config). Raises ``ValueError`` on unknown or bad values."""
    args = vars(_parser().parse_args(argv))
    cfg = dict(DEFAULTS)
    path = args.pop("config", None)
    if path is not None:
        import yaml

        if not Path(path).is_file():
            raise ValueError(f"Config file not found: {path}")
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of option: value.")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}.")
        cfg.update(loaded)
        cfg["config"] = str(path)
    cfg.update(args)
    for key, choices in _CHOICES.items():
        if choices and cfg[key] not in choices:
            raise ValueError(f"Unknown {key} {cfg[key]!r}; choose one of {', '.join(c for c in choices if c)}.")
    if cfg["n_experiences"] is None:
        cfg["n_experiences"] = 10 if cfg["benchmark"] == "split_cifar100" else 5
    if cfg["task_incremental"] and cfg["eval_on"] == "all":
        raise ValueError("--eval-on all cannot go with --task-incremental: tasks not trained yet have no head; "
                         "use --eval-on seen.")
    if cfg["retention_data"] and not cfg["backbone_weights"]:
        raise ValueError("--retention-data measures the pretraining task through the pretrained head: "
                         "give --backbone-weights too.")
    if cfg["replay"] is not None and cfg["method"] == "replay":
        raise ValueError("--method replay has its own memory: set its size with --mem-size, not --replay.")
    if cfg["replay"] is not None and getattr(REGISTRY.get(cfg["method"]), "trains_jointly", False):
        raise ValueError("--method joint trains on all experiences at once: --replay has nothing to add; drop it.")
    if cfg["benchmark"] == "arrays" and not cfg["data"]:
        raise ValueError("--benchmark arrays needs --data <file.npz>.")
    _check_ranges(cfg)
    from models import parse_normalization

    parse_normalization(cfg["normalization"])  # a bad value fails now
    _, kwargs, recipe = resolve_method(cfg)
    for k, v in kwargs.items():  # the run's config says what ran
        if k in cfg:
            cfg[k] = v
    if getattr(REGISTRY[cfg["method"]], "always_masked", False):
        cfg["masked_loss"] = True
    training = recipe.as_dict()
    for k in TRAINING_OPTIONS:
        cfg[k] = training[k]
    if cfg["out"] is None:
        cfg["out"] = f"runs/{cfg['method']}-{cfg['backbone'].replace(':', '_')}-seed{cfg['seed']}"
    return cfg


def _target(spec):
    """CLI form of a module pattern: comma-separated suffixes or a regex."""
    if spec is None or not isinstance(spec, str):
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()] if "," in spec else spec


def _device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"Unknown device {spec!r}; use cpu, cuda, cuda:N or auto.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu.")
    return dev


def build_benchmark(cfg: dict, normalization=None):
    from .benchmarks import arrays_benchmark, split_cifar10, split_cifar100

    common = dict(seed=cfg["seed"], return_task_id=cfg["task_incremental"], subset=cfg["subset"],
                  eval_subset=cfg["eval_subset"], image_size=cfg["image_size"], normalization=normalization,
                  validation=cfg.get("validation"))
    if cfg["benchmark"] == "arrays":
        return arrays_benchmark(cfg["data"], cfg["n_experiences"], **common)
    fn = split_cifar10 if cfg["benchmark"] == "split_cifar10" else split_cifar100
    return fn(cfg["n_experiences"], data=cfg["data"], dataset_root=cfg["dataset_root"], **common)


def build_model(cfg: dict, n_classes: int, classes_per_exp: int, *, return_pretrained_head: bool = False):
    """The backbone with a class-IL head or per-task heads; optionally also a frozen copy of the pretrained head
    (before it is replaced), for measuring retention of the pretraining task."""
    import copy

    from models import TaskIncrementalClassifier, build_backbone, find_head, replace_head

    w = cfg["backbone_weights"]
    backbone = build_backbone(cfg["backbone"], n_classes, weights=None if w == "pretrained" else w,
                              tf_same_padding=cfg.get("tf_same_padding", False),
                              pretrained=w == "pretrained", keep_pretrained_head=return_pretrained_head)
    pretrained_head = None
    if return_pretrained_head and w is not None:
        pretrained_head = copy.deepcopy(find_head(backbone)[1]).requires_grad_(False)
        if pretrained_head.out_features != n_classes or not cfg["keep_head"] or cfg["task_incremental"]:
            replace_head(backbone, n_classes)
    elif w is not None and not cfg["keep_head"] and not cfg["task_incremental"]:
        replace_head(backbone, n_classes)  # class-IL learns its head from scratch unless told to keep it
    model = TaskIncrementalClassifier(backbone, classes_per_exp) if cfg["task_incremental"] else backbone
    return (model, pretrained_head) if return_pretrained_head else model


def build_strategy(cfg: dict, model, common: dict):
    """The Avalanche strategy of ``cfg["method"]`` (its plugin is ``strategy.method_plugin``) with the method's
    options and training recipe (see :func:`resolve_method`), its learning-rate schedule and, unless
    ``keep_optimizer_state``, a fresh optimizer state per experience."""
    from strategies.recipe import build_optimizer

    cls, kwargs, recipe = resolve_method(cfg)
    if kwargs.get("target_modules") is not None:
        target = _target(kwargs["target_modules"])
        kwargs["target_modules"] = target  # "auto" is resolved on the model (models.auto_targets)
    for key in ("exclude_modules", "grow_modules"):
        if kwargs.get(key) is not None:
            kwargs[key] = _target(kwargs[key])
    opt = build_optimizer(recipe, model.parameters(), common["train_mb_size"])
    plugins = list(common.get("plugins") or [])
    if recipe.schedule_plugin() is not None:
        plugins.append(recipe.schedule_plugin())
    common = dict(common, plugins=plugins)
    return cls(model=model, optimizer=opt, reset_optimizer_state=not cfg["keep_optimizer_state"], **kwargs, **common)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a reader never sees a half-written file


_ACC_RE = re.compile(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$")
_TII_RE = re.compile(r"TII_Acc_Exp/eval_phase/test_stream/Exp(\d+)$")


def summarize(matrix: list[list[float | None]], initial: list[float | None] | None = None, *,
              joint: bool = False) -> dict:
    """Figures from the accuracy matrix R (row i: after training experience i):

    * ``average_accuracy[i]``: mean of R[i][j] over j <= i (the experiences seen so far); ``A_last`` is its final
      value ("last accuracy", also ``final_average_accuracy``) and ``A_avg`` its mean over i (PILOT's / InfLoRA's
      "average accuracy");
    * ``forgetting_per_experience[j]`` = R[j][j] - R[last][j] for j < last (Avalanche's definition), their mean
      ``average_forgetting``, and ``bwt`` = -average_forgetting;
    * with the accuracies before any training (``initial``, b) and R's upper triangle, ``forward_transfer`` =
      mean over i >= 1 of R[i-1][i] - b[i] (Lopez-Paz & Ranzato, GEM, 2017).

    ``joint``: R is one row, after training on every experience at once: ``A_last`` is its mean, and the figures of a
    sequence (``A_avg``, forgetting, BWT) are ``None``.
    """
    if joint:
        last = float(np.mean(matrix[-1])) if matrix else None
        return dict(average_accuracy=[last] if matrix else [], final_average_accuracy=last, A_last=last, A_avg=None,
                    forgetting_per_experience=[], average_forgetting=None, bwt=None)
    avg = [float(np.mean([r[j] for j in range(i + 1)])) for i, r in enumerate(matrix)]
    last = len(matrix) - 1
    forg = [matrix[j][j] - matrix[last][j] for j in range(last)]
    out = dict(
        average_accuracy=avg,
        final_average_accuracy=avg[-1] if avg else None,
        A_last=avg[-1] if avg else None,
        A_avg=float(np.mean(avg)) if avg else None,
        forgetting_per_experience=forg,
        average_forgetting=float(np.mean(forg)) if forg else None,
        bwt=-float(np.mean(forg)) if forg else None,
    )
    if initial is not None:
        fwt = [matrix[i - 1][i] - initial[i] for i in range(1, len(matrix))
               if matrix[i - 1][i] is not None and initial[i] is not None]
        out["forward_transfer"] = float(np.mean(fwt)) if fwt else None
    return out


def build_retention_dataset(cfg: dict, normalization):
    """The test split of ``--retention-data`` with the benchmark's eval transform (and normalisation)."""
    import torch
    from torchvision import transforms

    from .benchmarks import ArrayImageDataset, _subsample, load_arrays

    a = load_arrays(cfg["retention_data"])
    x, y = a["x_test"], a["y_test"]
    if cfg["retention_subset"]:
        n_cls = int(y.max()) + 1
        x, y = _subsample(x, y, max(1, cfg["retention_subset"] // n_cls), cfg["seed"])
    tf = [transforms.Grayscale(3)] if x.ndim == 3 else []
    if cfg["image_size"]:
        tf.append(transforms.Resize(cfg["image_size"]))
    tf += [transforms.ToTensor(), transforms.Normalize(*normalization)]
    ds = ArrayImageDataset(x, y)
    pipeline = transforms.Compose(tf)

    class _Transformed(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            img, label = ds[i]
            return pipeline(img), label

    return _Transformed()


def _write_metrics_csv(path: Path, all_metrics: dict) -> None:
    """Every scalar metric Avalanche collected (ours included, which its CSVLogger drops): name, x, value."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w") as f:
        f.write("metric,x,value\n")
        for name, (xs, values) in sorted(all_metrics.items()):
            for x, v in zip(xs, values):
                if isinstance(v, (int, float)):
                    f.write(f"{name},{x},{v}\n")
    os.replace(tmp, path)


def run(cfg: dict) -> dict:
    """Run the experiment described by ``cfg`` (see :func:`parse_config`) and return the final results dict."""
    import torch
    from avalanche.evaluation.metrics import (
        accuracy_metrics,
        bwt_metrics,
        forgetting_metrics,
        loss_metrics,
        timing_metrics,
    )
    from avalanche.distributed import DistributedHelper
    from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    from models import count_parameters, default_normalization, lora_layers, parse_normalization
    from strategies import unwrap

    from .checkpoint import load_checkpoint, save_checkpoint
    from strategies import (
        AccuracyCurvePluginMetric,
        FiniteLossPlugin,
        FreezeBatchNormPlugin,
        NonFiniteLossError,
        ParameterGrowthPluginMetric,
        PretrainingRetentionPluginMetric,
        RankUsagePluginMetric,
        SpectralEnergyPluginMetric,
        TaskInferenceAccuracyPluginMetric,
    )

    t_start = time.perf_counter()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    distributed = _init_distributed(cfg)
    main_process = DistributedHelper.is_main_process
    device = DistributedHelper.make_device() if distributed else _device(cfg["device"])
    out = Path(cfg["out"])
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(out / "checkpoint.pt", cfg) if cfg["resume"] else None

    # the benchmark first (it needs only the config); pretrained weights may ask for their own normalisation
    pretrained = cfg["backbone_weights"] is not None
    bm = build_benchmark(cfg, parse_normalization(cfg["normalization"])
                         or default_normalization(cfg["backbone"], pretrained))
    n_classes = bm.n_total_classes
    classes_per_exp = n_classes // cfg["n_experiences"]
    T = len(bm.train_stream)

    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model, pretrained_head = build_model(cfg, n_classes, classes_per_exp, return_pretrained_head=True)
    bn = cfg["bn"]
    if bn == "auto":  # per-task BN copies exist to train; a pretrained backbone's shared BN must not drift
        bn = "frozen" if pretrained and not cfg["per_task_bn"] else "train"

    plugins = [FiniteLossPlugin()] + ([FreezeBatchNormPlugin()] if bn == "frozen" else [])
    if cfg["replay"]:
        from avalanche.training.plugins import ReplayPlugin

        plugins.append(ReplayPlugin(mem_size=cfg["replay"]))
    start = 0 if ckpt is None else ckpt["experience"] + 1
    loggers, log_file, csv_logger = [], None, None
    if main_process:  # Avalanche's loggers refuse to exist on other ranks
        log_file = open(out / "log.txt", "a")
        csv_logger = CSVLogger(str(out / ("csv" if start == 0 else f"csv-resumed-at-{start}")))
        loggers = [TextLogger(log_file), csv_logger, TensorboardLogger(str(out / "tb"))]
        if cfg["progress"]:
            loggers.insert(0, InteractiveLogger())
        if cfg["wandb"]:
            from avalanche.logging import WandBLogger

            import hashlib

            # one W&B run per output directory, continued by --resume (also avoids Avalanche 0.6's call of
            # wandb.util.generate_id, which recent wandb releases dropped)
            run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
            class _WandBLogger(WandBLogger):  # Avalanche 0.6 reads wandb.viz.CustomChart, gone from current wandb
                def import_wandb(self):
                    super().import_wandb()
                    if not hasattr(self.wandb, "viz"):
                        import types

                        chart = getattr(getattr(self.wandb, "plot", None), "CustomChart", None)
                        self.wandb.viz = types.SimpleNamespace(CustomChart=chart or type("CustomChart", (), {}))

            loggers.append(_WandBLogger(project_name=cfg["wandb"], run_name=out.name, dir=str(out),
                                       config={k: v for k, v in cfg.items() if not isinstance(v, (list, dict))},
                                       params=dict(id=run_id, resume="allow")))
    ours = dict(growth=ParameterGrowthPluginMetric(), curve=AccuracyCurvePluginMetric(),
                ranks=RankUsagePluginMetric(), spectra=SpectralEnergyPluginMetric(),
                tii=TaskInferenceAccuracyPluginMetric())
    if cfg["retention_data"]:
        ours["retention"] = PretrainingRetentionPluginMetric(
            build_retention_dataset(cfg, bm.normalization), pretrained_head, batch_size=cfg["eval_batch_size"])
    evaluator = EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        timing_metrics(epoch=True, experience=True),
        *ours.values(),
        loggers=loggers,
    )
    common = dict(
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=cfg["batch_size"], train_epochs=cfg["epochs"],
        eval_mb_size=cfg["eval_batch_size"], device=device, plugins=plugins, evaluator=evaluator,
    )
    strategy = build_strategy(cfg, model, common)
    plugin = getattr(strategy, "method_plugin", None)
    if ckpt is not None and ((plugin is not None and not hasattr(plugin, "state_dict")) or cfg["replay"]):
        # Avalanche's EWC / LwF / replay plugins keep what they learnt (importances, teacher, memory) in objects the
        # checkpoint cannot hold: a resumed run would silently be another algorithm
        raise ValueError(f"--resume: {'replay' if cfg['replay'] else cfg['method']} keeps state (memory, teacher or "
                         "importances) that the checkpoint does not hold; rerun without --resume (a fresh --out).")
    lora_info = None
    if hasattr(plugin, "prepare"):  # the LoRA methods (the baselines' plugins are Avalanche's own)
        # inject now (the plugin would do it when training starts) so that bad targets fail before any work
        plugin.prepare(model)
    if lora_layers(model):
        layer = lora_layers(model)[0][1]
        lora_info = dict(r=layer.r, alpha=layer.alpha, scaling=layer.scaling, rslora=layer.rslora,
                         dropout=getattr(layer.lora_dropout, "p", 0.0), conv_mode=getattr(layer, "conv_mode", None),
                         target_modules=cfg["target_modules"], adapted_modules=[n for n, _ in lora_layers(model)])
    _, method_kwargs, recipe = resolve_method(cfg)

    if ckpt is not None:
        results = _restore(ckpt, strategy, model, plugin, bm, device)
        results.setdefault("resumed_at", []).append(start)
        # the metrics' histories continue where the checkpoint left them
        ours["ranks"].history = list(results.get("rank_usage") or [])
        ours["spectra"].history = list(results.get("spectra") or [])
        ours["curve"].last = list(results.get("average_accuracy") or [])
        # growth is relative to the backbone as it was before the first experience, not as restored
        ours["growth"].backbone = results.get("parameters_backbone")
        if "retention" in ours:
            ours["retention"].history = list(results.get("pretraining_retention") or [])
            ours["retention"].per_class_history = list(results.get("pretraining_retention_per_class") or [])
    else:
        results = dict(
            config={k: v for k, v in cfg.items()},
            benchmark=dict(
                name=cfg["benchmark"], n_experiences=T, seed=cfg["seed"], data_source=bm.data_source,
                scenario="task-incremental" if cfg["task_incremental"] else "class-incremental",
                class_order=[int(c) for c in bm.classes_order_original_ids],
                classes_per_experience=[sorted(int(c) for c in bm.original_classes_in_exp[i]) for i in range(T)],
                train_sizes=[len(e.dataset) for e in bm.train_stream],
                test_sizes=[len(e.dataset) for e in bm.test_stream],
                eval_split=("validation: " + str(cfg["validation"]) + " training images per experience held out"
                            if cfg.get("validation") else "test"),
                normalization=[list(bm.normalization[0]), list(bm.normalization[1])],
            ),
            model=dict(backbone=cfg["backbone"], weights=cfg["backbone_weights"], bn=bn, device=str(device),
                       parameters_before_training=count_parameters(model), lora=lora_info,
                       **({"grown_modules": plugin.grown_modules} if hasattr(plugin, "grown_modules") else {})),
            method=cfg["method"],
            method_options={k: v for k, v in method_kwargs.items()
                            if isinstance(v, (bool, int, float, str, type(None)))},
            training=dict(recipe.as_dict(cfg["batch_size"]), epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                          reset_optimizer_state=not cfg["keep_optimizer_state"]),
            experiences_done=0,
            accuracy_matrix=[],
            parameters=[],
            train_time_s=[],
            train_iterations=[],
            eval_time_s=[],
            avalanche={},
            finished=False,
        )
        if distributed:
            results["distributed"] = dict(world_size=DistributedHelper.world_size, backend=DistributedHelper.backend,
                                          ranks_in_sync=[])
    if "retention" in ours and "pretraining_accuracy" not in results:  # the reference retention is measured against
        results["pretraining_accuracy"] = ours["retention"].measure(model.to(device), device)
        results["pretraining_accuracy_per_class"] = ours["retention"]._per_class
    if main_process:
        _write_json(out / "results.json", results)

    try:
        if cfg["eval_on"] == "all" and start == 0:  # accuracy before any training: the forward-transfer baseline
            strategy.eval(bm.test_stream, num_workers=cfg["num_workers"])
            init = [None] * T
            for name, value in strategy.evaluator.get_last_metrics().items():
                m = _ACC_RE.match(name)
                if m:
                    init[int(m.group(1))] = float(value)
            results["initial_accuracy"] = init
        # joint training (the upper bound) is one step on the whole stream, evaluated on every test experience
        joint = bool(getattr(REGISTRY[cfg["method"]], "trains_jointly", False))
        steps = [(T - 1, list(bm.train_stream))] if joint else list(enumerate(bm.train_stream))
        for i, exp in steps:
            if i < start:
                continue
            t0 = time.perf_counter()
            strategy.train(exp, num_workers=cfg["num_workers"])
            t1 = time.perf_counter()
            eval_stream = bm.test_stream[: i + 1] if cfg["eval_on"] == "seen" else bm.test_stream
            strategy.eval(eval_stream, num_workers=cfg["num_workers"])
            t2 = time.perf_counter()
            last = strategy.evaluator.get_last_metrics()
            row: list = [None] * T
            for name, value in last.items():
                m = _ACC_RE.match(name)
                if m and int(m.group(1)) < (i + 1 if cfg["eval_on"] == "seen" else T):
                    row[int(m.group(1))] = float(value)
            results["accuracy_matrix"].append(row)
            tii = [None] * T
            for name, value in last.items():
                m = _TII_RE.match(name)
                if m:
                    tii[int(m.group(1))] = float(value)
            if any(v is not None for v in tii):  # methods that infer the task (hide_lora)
                results.setdefault("tii_accuracy", []).append(tii)
            results["parameters"].append(ours["growth"].result())
            results["parameters_backbone"] = ours["growth"].backbone
            results["train_time_s"].append(t1 - t0)
            results["train_iterations"].append(strategy.clock.train_exp_iterations)
            results["eval_time_s"].append(t2 - t1)
            results["experiences_done"] = i + 1
            results.update(summarize(results["accuracy_matrix"], results.get("initial_accuracy"), joint=joint))
            results["rank_usage"] = ours["ranks"].history if lora_info else None
            results["spectra"] = ours["spectra"].history
            if "retention" in ours:
                results["pretraining_retention"] = ours["retention"].history
                results["pretraining_retention_per_class"] = ours["retention"].per_class_history
            results["avalanche"] = {
                k: float(v) for k, v in last.items()
                if k.startswith(("StreamForgetting", "StreamBWT", "Top1_Acc_Stream/eval_phase"))
            }
            results["train_step_time_s"] = sum(results["train_time_s"]) / max(1, sum(results["train_iterations"]))
            if hasattr(plugin, "rank_history"):
                results["rank_history"] = plugin.rank_history
            if hasattr(plugin, "subspace_history"):
                results["subspace_history"] = plugin.subspace_history
            if getattr(plugin, "degraded", None):
                results["rank_degraded"] = plugin.degraded
            if hasattr(plugin, "orth_history"):
                results["orth_loss_history"] = plugin.orth_history
            if distributed:
                results["distributed"]["ranks_in_sync"].append(_ranks_in_sync(unwrap(strategy.model), plugin))
            results["wall_time_s"] = results.get("wall_time_s_before_resume", 0.0) + time.perf_counter() - t_start
            if main_process:
                _write_json(out / "results.json", results)
                _write_metrics_csv(out / "metrics.csv", strategy.evaluator.get_all_metrics())
                save_checkpoint(out / "checkpoint.pt", cfg=cfg, experience=i, model=unwrap(strategy.model),
                                optimizer=strategy.optimizer, plugin=plugin, clock=strategy.clock, results=results)
            if distributed:
                DistributedHelper.barrier()
        results["finished"] = True
        if main_process:
            _write_json(out / "results.json", results)
    except NonFiniteLossError as e:  # keep every finished experience's results, say where it stopped
        results["stopped"] = dict(reason=str(e), experience=e.experience, epoch=e.epoch, iteration=e.iteration)
        if main_process:
            _write_json(out / "results.json", results)
        raise
    finally:
        if csv_logger is not None:
            csv_logger.close()
        if log_file is not None:
            log_file.close()
    return results


def evaluate_checkpoint(cfg: dict) -> list:
    """Accuracy of the model in ``<out>/checkpoint.pt`` on every test experience it was trained on, evaluated in
    this single process (e.g. to check a distributed run's reported numbers)."""
    import torch
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from models import default_normalization, parse_normalization

    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(cfg["out"]) / "checkpoint.pt", cfg)
    bm = build_benchmark(cfg, parse_normalization(cfg["normalization"])
                         or default_normalization(cfg["backbone"], cfg["backbone_weights"] is not None))
    model = build_model(cfg, bm.n_total_classes, bm.n_total_classes // cfg["n_experiences"])
    strategy = build_strategy(cfg, model, dict(
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=cfg["batch_size"], eval_mb_size=cfg["eval_batch_size"],
        device=_device(cfg["device"]), evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])))
    plugin = getattr(strategy, "method_plugin", None)
    if hasattr(plugin, "prepare"):
        plugin.prepare(model)
    _restore(ckpt, strategy, model, plugin, bm, strategy.device)
    done = ckpt["experience"] + 1
    strategy.eval(bm.test_stream[:done])
    row = [None] * len(bm.test_stream)
    for name, value in strategy.evaluator.get_last_metrics().items():
        m = _ACC_RE.match(name)
        if m:
            row[int(m.group(1))] = float(value)
    return row


def _init_distributed(cfg: dict) -> bool:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL with CUDA)."""
    import torch
    from avalanche.distributed import DistributedHelper

    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if not DistributedHelper.is_distributed:
        use_cuda = cfg["device"] != "cpu"
        if use_cuda and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu.")
        DistributedHelper.init_distributed(cfg["seed"], use_cuda=use_cuda)
    return True


def _tensors(obj, prefix: str):
    """Every tensor inside nested dicts / lists, by dotted path."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def _ranks_in_sync(model, plugin=None) -> bool:
    """Whether every rank holds bit-identical parameters and buffers, and the same tensors in the method plugin's
    state (e.g. HiDe-LoRA's second model, statistics, subspaces); raises, naming the tensors, if not."""
    import hashlib

    from avalanche.distributed import DistributedHelper

    named = dict(model.state_dict())
    if plugin is not None and hasattr(plugin, "state_dict"):
        named.update(_tensors(plugin.state_dict(), "plugin"))
    mine = {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for k, v in named.items()}
    everyone = DistributedHelper.gather_all_objects(mine)
    differ = sorted(k for k in mine if len({d.get(k) for d in everyone}) != 1)
    if differ:
        raise RuntimeError(f"Ranks hold different tensors after an experience: {differ[:10]}"
                           f"{' ...' if len(differ) > 10 else ''} ({len(differ)} of {len(mine)}).")
    return True


def _restore(ckpt: dict, strategy, model, plugin, bm, device) -> dict:
    """Bring a freshly built strategy to the state saved after experience ``ckpt['experience']``."""
    from avalanche.models.utils import avalanche_model_adaptation

    from .checkpoint import restore_optimizer, restore_rng

    done = ckpt["experience"] + 1
    model.train()
    for exp in bm.train_stream[:done]:  # heads and task bookkeeping that Avalanche creates while training
        avalanche_model_adaptation(model, exp)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"Checkpoint model does not fit this run's model: {' '.join(str(e).split())[:400]}") from e
    model.to(device)
    strategy.make_optimizer(reset_optimizer_state=True)  # Avalanche's first call, made now so the state survives
    restore_optimizer(strategy.optimizer, model, ckpt["optimizer"])
    if plugin is not None:
        plugin.load_state_dict(ckpt["plugin"])
    for k, v in ckpt["clock"].items():
        setattr(strategy.clock, k, v)
    results = ckpt["results"]
    results["wall_time_s_before_resume"] = results.get("wall_time_s", 0.0)
    restore_rng(ckpt)  # last: nothing may draw random numbers between here and the next experience
    return results


def _print_summary(res: dict) -> None:
    T = res["benchmark"]["n_experiences"]
    print("\naccuracy matrix (row i: after training experience i; column j: test experience j)")
    print("      " + " ".join(f"exp{j:<3d}" for j in range(T)))
    for i, row in enumerate(res["accuracy_matrix"]):
        print(f"after{i:<2d}" + " ".join("  -   " if v is None else f"{v:6.3f}" for v in row))
    print(f"average accuracy: {res['final_average_accuracy']:.4f}  "
          f"average forgetting: {res['average_forgetting'] if res['average_forgetting'] is None else round(res['average_forgetting'], 4)}")
    p = res["parameters"][-1]
    print(f"parameters: trainable {p['trainable']:,}  adapter {p['adapter']:,}  total {p['total']:,}  "
          f"stored {p['stored']:,}  inference {p['inference']:,}")
    if res.get("tii_accuracy"):
        print("task-identity inference accuracy after the last experience: "
              + " ".join("  -  " if v is None else f"{v:.3f}" for v in res["tii_accuracy"][-1]))
    print(f"wall time: {res['wall_time_s']:.1f} s")


def main(argv=None) -> int:
    import shlex

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = None
    try:
        cfg = parse_config(argv)
        res = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if cfg is None:
            print("interrupted.", file=sys.stderr)
            return 130
        again = argv + ([] if "--resume" in argv else ["--resume"])
        again += [] if any(a == "--out" or a.startswith("--out=") for a in argv) else ["--out", cfg["out"]]
        print(f"interrupted: the finished experiences are in {cfg['out']}/results.json; continue with: "
              f"python -m experiments.run {shlex.join(again)}", file=sys.stderr)
        return 130
    except FloatingPointError as e:
        print(f"error: {e} Results of the finished experiences are in {cfg['out']}/results.json.", file=sys.stderr)
        return 3
    from avalanche.distributed import DistributedHelper

    if DistributedHelper.is_main_process:
        _print_summary(res)
        print(f"results: {Path(cfg['out']) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
