"""Shared fixtures. Real data and weights come from $LOWRANK_CL_DATA / $LOWRANK_CL_WEIGHTS (never from a fixed
path); without them those tests are skipped, unless $LOWRANK_CL_REQUIRE_SHARED=1 (CI) turns the skip into a failure."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))

# what makes a test `slow` (deselect with `pytest -m "not slow"`): real data or pretrained weights, other processes
# (subprocess, torchrun), notebooks, benchmarks, whole CLI runs; the rest are unit tests on made tensors and data
_SLOW_FIXTURES = {"cifar10_npz", "mnist_npz", "resnet32_weights", "mobilenet_v2_weights"}
# end-to-end: whole runs through the CLI or a strategy over real-size models, each seconds to a minute
_SLOW_FILES = {"test_notebooks.py", "test_bench.py", "test_suite.py", "test_run.py", "test_reliability.py",
               "test_zoo.py"}
# ... but for their unit tests on made values, which run in milliseconds
_FAST_IN_SLOW_FILES = {"test_summarize_against_hand_computed_values", "test_hand_counts_of_the_backbones",
                       "test_every_registry_method_has_a_hand_count", "test_same_pad_matches_tensorflow_same_arithmetic"}


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        source = inspect.getsource(fn) if fn is not None else ""
        slow_file = item.path.name in _SLOW_FILES and item.originalname not in _FAST_IN_SLOW_FILES
        if (_SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))) or slow_file \
                or "subprocess" in source or "torchrun" in source:
            item.add_marker(pytest.mark.slow)


def _shared(env: str, rel: str) -> Path:
    root = os.environ.get(env)
    path = Path(root) / rel if root else None
    if path is None or not path.exists():
        msg = f"needs {rel} under ${env} (real data/weights are not in the repo)"
        if os.environ.get("LOWRANK_CL_REQUIRE_SHARED") == "1":
            pytest.fail(msg + "; LOWRANK_CL_REQUIRE_SHARED=1 makes this a failure")
        pytest.skip(msg)
    return path


@pytest.fixture
def cifar10_npz() -> Path:
    return _shared("LOWRANK_CL_DATA", "cifar10.npz")


@pytest.fixture
def mnist_npz() -> Path:
    return _shared("LOWRANK_CL_DATA", "mnist_10k.npz")


@pytest.fixture
def resnet32_weights() -> Path:
    root = os.environ.get("LOWRANK_CL_WEIGHTS")
    flat = Path(root) / "resnet32-d509ac18.th" if root else None
    if flat is not None and flat.is_file():
        return flat
    return _shared("LOWRANK_CL_WEIGHTS", "cifar_resnet/resnet32-d509ac18.th")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_bm(tmp_path):
    """A 2-experience Split CIFAR-10 of made images (8 per class) whose red channel encodes the class."""
    from experiments.benchmarks import split_cifar10

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 8)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    x[..., 0] = (y * 25)[:, None, None]
    path = tmp_path / "c10.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[::4], y_test=y[::4])
    return split_cifar10(2, seed=0, data=path)


def small_model(kind: str):
    """``(model, target_modules)``: a random-init CIFAR ResNet-20 with LoRA targets on its last stage's convs, or a
    2-block ViT with targets on qkv and fc2 (the two backbone families every method is tested on)."""
    from models import cifar_resnet, vit_cifar

    if kind == "resnet":
        return cifar_resnet(20, 10), r"layer3\.\d+\.conv[12]"
    return vit_cifar(10, depth=2, embed_dim=48, num_heads=3), ["attn.qkv", "mlp.fc2"]


@pytest.fixture
def mobilenet_v2_weights() -> Path:
    return _shared("LOWRANK_CL_WEIGHTS", "mobilenet_v2/mobilenet_v2_imagenet.pt")


def assert_learned(results: dict, margin: float) -> list:
    """Every trained experience was learnt: the accuracy on its test data right after training it (the diagonal of
    ``results["accuracy_matrix"]``; joint training: its single row, after every experience at once) is above chance
    by ``margin``. Chance is 1 / classes of the experience in task-IL (its own head), 1 / classes seen so far in
    class-IL (the diagonal is the experience's test data classified over every seen class). Returns the checked
    accuracies."""
    m = results["accuracy_matrix"]
    bench = results["benchmark"]
    sizes = [len(c) for c in bench["classes_per_experience"]]
    task_il = bench["scenario"] == "task-incremental"
    assert m, "no experience finished"
    if len(m) == 1 and bench["n_experiences"] > 1 and results.get("method") == "joint":
        cells = [(0, j, sum(sizes)) for j in range(len(sizes))]  # one row after all experiences: every class seen
    else:
        cells = [(i, i, sum(sizes[: i + 1])) for i in range(len(m))]
    checked = []
    for i, j, seen in cells:
        chance = 1.0 / (sizes[j] if task_il else seen)
        acc = m[i][j]
        assert acc is not None and acc > chance + margin, (
            f"experience {j} not learnt: accuracy {acc} after training it, chance {chance:.3f} + margin {margin} "
            f"(matrix {m})")
        checked.append(acc)
    return checked


def calibrated_resnet20(data, out) -> "Path":
    """A random-init CIFAR ResNet-20 (fixed seed) whose BatchNorm statistics are those of ``data``'s training
    images (with the ImageNet normalisation ``experiments.run`` gives weights), saved to ``out``. Passed as
    ``--backbone-weights`` its BatchNorm is frozen (``--bn auto``), so training and evaluation compute the same
    function: with train-mode BatchNorm a few mini-batches of 4-8 images leave the running statistics far from the
    batch ones and the evaluation of a model that fits its training data can sit at chance."""
    from models import cifar_resnet
    from models.backbones import IMAGENET_NORMALIZATION

    x = np.load(data)["x_train"].astype(np.float32) / 255.0
    mean, std = (np.asarray(v, dtype=np.float32) for v in IMAGENET_NORMALIZATION)
    x = torch.from_numpy((x - mean) / std).permute(0, 3, 1, 2).contiguous()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cifar_resnet(20, 10)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the statistics of every image
    model.train()
    with torch.no_grad():
        for chunk in x.split(64):
            model(chunk)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = 0.1
    torch.save(model.state_dict(), out)
    return Path(out)


def backbone_shapes(backbone: str, r: int) -> dict:
    """Counts of a plain, freshly built backbone, from its layer shapes: ``body`` (parameters without the classifier
    head), ``features`` (the head's input size), ``bn`` (BatchNorm weights and biases) and, for every layer that
    ``--target-modules auto`` adapts, ``{name: (fan_in, LoRA parameters at rank r)}``: A (r, in, k, k) and B
    (out, r, 1, 1) on a conv (``kxk_1x1``), A (r, in) and B (out, r) on a Linear."""
    import re

    from models import cifar_resnet, vit_cifar

    if backbone.startswith("cifar_resnet"):
        model, head, target = cifar_resnet(int(backbone[len("cifar_resnet"):]), 10), "linear", r"layer\d\.\d+\.conv[12]"
    elif backbone == "vit_cifar":
        model, head, target = vit_cifar(10), "head", r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    else:
        raise ValueError(backbone)
    layers = {}
    for name, module in model.named_modules():
        if re.fullmatch(target, name):
            w = module.weight  # (out, in, k, k) or (out, in)
            fan_in = w[0].numel()
            layers[name] = (fan_in, r * fan_in + w.shape[0] * r)
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(head + "."))
    bn = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    # the last stage (from the last downsampling block on): a CIFAR ResNet's layer3, a ViT has none
    last = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layer3.")) \
        if backbone.startswith("cifar_resnet") else None
    return dict(body=body, features=getattr(model, head).in_features, layers=layers, bn=bn, last_stage=last)


def expected_parameters(results: dict, backbone: str, r: int | None = None, *, per_task_bn: bool = False,
                        n_centroids: int | None = None) -> list:
    """``[(stored, inference)]`` after each experience of a finished run, computed by hand from the backbone's layer
    shapes and the definition of the method (not from the library's counters). ``L`` is one adapter set (every
    adapted layer's A and B), ``t`` the experiences trained so far; a class-IL model has one head over every class, a
    task-IL model one head per trained task (a forward pass uses one):

    * naive, replay, ncm, linear_probe, joint: the model;
    * merge_lora, codyra: merged, so the backbone and heads only (the fresh adapters are training state);
    * eblora: merged, and stores its protected subspaces F (fan_in x size per layer) for later tasks;
    * per_task_lora: one adapter set per task (and one copy of every BatchNorm with ``per_task_bn``), one of them per
      forward pass (a task's BatchNorm copy is used in place of the backbone's);
    * o_lora: one LoRA per task, all summed at inference;
    * sd_lora: one direction (A, B) per task, all summed at inference, and one learnable magnitude per task;
    * inflora: one branch (A and B) per task, all summed at inference, and its DualGPM bases (fan_in x
      min(protected, fan_in - protected) per layer: a basis larger than half the space is stored by its complement);
    * hide_lora: one slot per task (one per forward pass), the task-shared model's own LoRA and head (the TII pass),
      and the class statistics of both models (means and variances, ``n_centroids`` clusters per class, for
      classifier alignment; not used at inference);
    * ewc: the parameters and their importances (Fisher) saved after every experience (``separate`` mode);
    * lwf: a frozen copy of the model after the last experience (the distillation teacher);
    * growing: one copy of the last stage per task besides the pretrained one (which starts every task's copy and
      serves the pretraining task), one of them per forward pass.
    """
    method = results["method"]
    bench = results["benchmark"]
    sizes = [len(c) for c in bench["classes_per_experience"]]
    task_il = bench["scenario"] == "task-incremental"
    a = backbone_shapes(backbone, r or 1)
    body, D = a["body"], a["features"]
    L = sum(n for _, n in a["layers"].values())
    fan_in = {name: f for name, (f, _) in a["layers"].items()}

    def heads(t):  # head parameters of a model that has trained t experiences
        if not task_il:
            C = sum(sizes)
            return D * C + C
        return sum(D * s + s for s in sizes[:t])

    def one_head():
        return D * sizes[0] + sizes[0] if task_il else heads(1)

    def short(name):
        return name[len("backbone."):] if name.startswith("backbone.") else name

    out = []
    for row in range(len(results["parameters"])):
        t = len(sizes) if method == "joint" else row + 1
        model, serve = body + heads(t), body + one_head()
        if method in ("naive", "replay", "ncm", "linear_probe", "joint", "merge_lora", "codyra"):
            stored, inference = model, serve
        elif method == "eblora":
            bases = sum(fan_in[short(n)] * k for n, k in results["subspace_history"][row].items())
            stored, inference = model + bases, serve
        elif method == "per_task_lora":  # a task's BatchNorm copy replaces the backbone's in its forward pass
            stored, inference = model + t * (L + (a["bn"] if per_task_bn else 0)), serve + L
        elif method == "o_lora":
            stored, inference = model + t * L, serve + t * L
        elif method == "sd_lora":
            stored, inference = model + t * (L + 1), serve + t * (L + 1)
        elif method == "inflora":
            prot = results["subspace_history"][row]["protected"]
            bases = sum(fan_in[short(n)] * min(p, fan_in[short(n)] - p) for n, p in prot.items())
            stored, inference = model + t * L + bases, serve + t * L
        elif method == "hide_lora":
            shared = L + heads(t)  # the shared model's LoRA and head (its frozen backbone is the same)
            per_class = [n // s for n, s in zip(bench["train_sizes"], sizes)]  # training images of each class
            stats = sum(2 * 2 * min(n_centroids, per_class[e]) * D for e in range(t) for _ in range(sizes[e]))
            stored, inference = model + t * L + shared + stats, serve + L + shared
        elif method == "ewc":
            saved = sum(2 * (body + heads(s)) for s in range(1, t + 1))
            stored, inference = model + saved, serve
        elif method == "lwf":
            stored, inference = model + model, serve
        elif method == "growing":
            stored, inference = model + t * a["last_stage"], serve
        else:
            raise AssertionError(f"no hand count for method {method!r}: add it to expected_parameters")
        out.append((stored, inference))
    return out


# the methods expected_parameters counts by hand (a test checks that it covers the registry)
HAND_COUNTED_METHODS = ("naive", "replay", "ncm", "linear_probe", "joint", "merge_lora", "codyra", "eblora",
                        "per_task_lora", "o_lora", "sd_lora", "inflora", "hide_lora", "ewc", "lwf", "growing")


def made_data(path, n_classes: int, per_class: int, test_step: int = 1):
    """An arrays file of made 32x32 images, ``per_class`` per class, whose red and blue channels encode the class as a
    point on a circle (128 + 100 (cos, sin) of 2 pi y / n_classes; the green channel is noise), with every
    ``test_step``-th image as the test set. On a circle each class is a vertex of the classes' convex hull, so a linear
    head separates every class from all the others: old classes' rows do not take over new classes, as they do when
    one channel carries the class as an intensity (the rows of the brightest old class then win on brighter new
    classes, and class-incremental methods that train on their own classes only sit at chance on the new ones)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes), per_class)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    angle = 2 * np.pi * y / n_classes
    x[..., 0] = np.round(128 + 100 * np.cos(angle)).astype(np.uint8)[:, None, None]
    x[..., 2] = np.round(128 + 100 * np.sin(angle)).astype(np.uint8)[:, None, None]
    np.savez(path, x_train=x, y_train=y, x_test=x[::test_step], y_test=y[::test_step])
    return Path(path)
