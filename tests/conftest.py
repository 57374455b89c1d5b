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


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        source = inspect.getsource(fn) if fn is not None else ""
        if (_SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))) or item.path.name in _SLOW_FILES \
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
