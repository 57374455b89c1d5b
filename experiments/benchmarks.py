"""Split CIFAR-10/100 and array benchmarks that build the same Avalanche benchmark whichever the image source.

Sources, in order: an arrays file (``data=`` / ``--data``, the ``.npz`` layout of ``x_train, y_train, x_test,
y_test``), or an ImageFolder directory with ``train/`` and ``test/`` (``data=<dir>``); else ``cifar10.npz`` /
``cifar100.npz`` in the directory named by ``$LOWRANK_CL_DATA``; else Avalanche's own download into
``dataset_root``. Every source goes through the same ``nc_benchmark`` call that Avalanche's ``SplitCIFAR10`` /
``SplitCIFAR100`` make, with their default transforms, so the class order for a ``seed`` is the same.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

__all__ = [
    "DATA_ENV",
    "ArrayImageDataset",
    "load_arrays",
    "split_cifar10",
    "split_cifar100",
    "arrays_benchmark",
    "CIFAR10_NORMALIZATION",
    "CIFAR100_NORMALIZATION",
]

DATA_ENV = "LOWRANK_CL_DATA"
# Avalanche's SplitCIFAR10 / SplitCIFAR100 defaults
CIFAR10_NORMALIZATION = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR100_NORMALIZATION = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_KEYS = ("x_train", "y_train", "x_test", "y_test")


class ArrayImageDataset(Dataset):
    """uint8 images in memory that look like torchvision's CIFAR datasets to Avalanche: ``.data`` (N, H, W, C),
    ``.targets`` (list of int), items ``(PIL.Image, int)``."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str] | None = None):
        self.data = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes) if classes is not None else None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.data[i]
        return Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB"), self.targets[i]


def load_arrays(path: str | os.PathLike, num_classes: int | None = None) -> dict:
    """Read and check an arrays file: keys, dtypes, shapes, labels in ``[0, num_classes)``.

    :raises FileNotFoundError: no such file.
    :raises ValueError: the file is not a valid arrays file, with what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz arrays file: {type(e).__name__}: {e}") from e
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"{path} lacks the keys {missing}; an arrays file needs x_train, y_train, x_test, y_test "
            f"(and optionally class_names). Keys found: {sorted(arrays)}."
        )
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise ValueError(
                f"{path}: x_{split} must be uint8 of shape (N, H, W) or (N, H, W, 3), got {x.dtype} {x.shape}."
            )
        if x.ndim == 4 and x.shape[-1] == 1:
            arrays[f"x_{split}"] = x = x[..., 0]
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{path}: y_{split} must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}."
            )
        if len(y) and y.min() < 0:
            raise ValueError(f"{path}: y_{split} has negative labels (min {y.min()}).")
        if num_classes is not None and len(y) and y.max() >= num_classes:
            raise ValueError(f"{path}: y_{split} has label {y.max()}, outside [0, {num_classes}).")
        arrays[f"y_{split}"] = y.astype(np.int64)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(f"{path}: train images {arrays['x_train'].shape[1:]} and test images "
                         f"{arrays['x_test'].shape[1:]} differ in shape.")
    return arrays


def _subsample(x, y, n_per_class: int | None, seed: int):
    """At most ``n_per_class`` images of each class, chosen with ``seed`` (keeps the original order)."""
    if n_per_class is None:
        return x, y
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(np.sort(rng.choice(idx, size=min(n_per_class, len(idx)), replace=False)))
    keep = np.sort(np.concatenate(keep))
    return x[keep], y[keep]


def _take(ds, idx):
    """The images ``idx`` of a CIFAR-like (``.data``) or ImageFolder (``.samples``) dataset, as a new dataset."""
    import copy

    ys = np.asarray(ds.targets)[idx]
    if hasattr(ds, "samples"):  # ImageFolder: keep lazily loaded files
        ds = copy.copy(ds)
        ds.samples = ds.imgs = [ds.samples[i] for i in idx]
        ds.targets = ys.tolist()
        return ds
    return ArrayImageDataset(np.asarray(ds.data)[idx], ys, getattr(ds, "classes", None))


def _subset_dataset(ds, n_per_class: int | None, seed: int):
    """A class-balanced subset of a CIFAR-like (``.data``) or ImageFolder (``.samples``) dataset."""
    if n_per_class is None:
        return ds
    idx, _ = _subsample(np.arange(len(ds.targets)), np.array(ds.targets), n_per_class, seed)
    return _take(ds, idx)


def _holdout_indices(y, n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, held_out)`` indices: ``n_per_class`` images of each class held out (chosen with ``seed``, with a
    stream of its own so the training subset drawn from the rest stays balanced), the rest kept; both sorted."""
    rng = np.random.default_rng([seed, 7919])
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) <= n_per_class:
            raise ValueError(f"validation: class {c} has {len(idx)} training images, too few to hold out "
                             f"{n_per_class} and still train; use a smaller --validation.")
        held.append(rng.choice(idx, size=n_per_class, replace=False))
    held = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(y)), held)
    return rest, held


def _with_validation(train, test, validation: int | None, n_classes: int, n_experiences: int, seed: int):
    """``(train, test)``, or with ``validation`` images per experience held out of the training set: ``(the rest of
    the training set, the held-out images)`` -- the held-out images replace the test set (hyper-parameter choice
    never sees it)."""
    if validation is None:
        return train, test
    n = _per_class(validation, n_classes, n_experiences)
    rest, held = _holdout_indices(np.asarray(train.targets), n, seed)
    return _take(train, rest), _take(train, held)


def _per_class(n_per_exp: int | None, n_classes: int, n_experiences: int) -> int | None:
    if n_per_exp is None:
        return None
    if n_per_exp <= 0:
        raise ValueError(f"subset must be a positive number of images per experience, got {n_per_exp}.")
    return max(1, math.ceil(n_per_exp / (n_classes // n_experiences)))


def _image_folder_datasets(root: Path):
    from torchvision.datasets import ImageFolder

    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ValueError(f"ImageFolder directory {root} must contain train/ and test/ with one folder per class.")
    tr, te = ImageFolder(str(root / "train")), ImageFolder(str(root / "test"))
    if tr.classes != te.classes:
        raise ValueError(f"{root}: train/ and test/ have different class folders.")
    return tr, te


def _check_split(n_classes: int, n_experiences: int, first_exp_with_half_classes: bool):
    if first_exp_with_half_classes:
        ok = n_experiences >= 2 and (n_classes // 2) % (n_experiences - 1) == 0
        hint = f"1 + a divisor of {n_classes // 2}"
    else:
        ok = n_experiences >= 1 and n_classes % n_experiences == 0
        hint = f"a divisor of {n_classes}"
    if not ok:
        raise ValueError(f"n_experiences={n_experiences} does not split the {n_classes} classes evenly; use {hint}.")


def _build(train, test, *, n_classes, n_experiences, first_exp_with_half_classes, return_task_id, seed,
           fixed_class_order, train_transform, eval_transform):
    from avalanche.benchmarks import nc_benchmark

    _check_split(n_classes, n_experiences, first_exp_with_half_classes)
    # the arguments of avalanche.benchmarks.classic.SplitCIFAR10/100, so every source splits the same way
    bm = nc_benchmark(
        train_dataset=train,
        test_dataset=test,
        n_experiences=n_experiences,
        task_labels=return_task_id,
        seed=seed,
        fixed_class_order=fixed_class_order,
        shuffle=True,
        per_exp_classes={0: n_classes // 2} if first_exp_with_half_classes else None,
        class_ids_from_zero_in_each_exp=return_task_id,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
    bm.n_total_classes = n_classes
    return bm


def _transforms(normalization, image_size: int | None, train_augment: bool, native_size: int):
    mean, std = normalization
    resize = [transforms.Resize(image_size)] if image_size and image_size != native_size else []
    size = image_size or native_size
    aug = [transforms.RandomCrop(size, padding=4 * size // 32), transforms.RandomHorizontalFlip()] if train_augment else []
    tail = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(resize + aug + tail), transforms.Compose(resize + tail)


def _split_cifar(kind: str, n_classes: int, default_norm, n_experiences, *, seed, data, dataset_root,
                 return_task_id, fixed_class_order, first_exp_with_half_classes, subset, eval_subset, normalization,
                 image_size, train_transform, eval_transform, validation=None):
    if seed is None and fixed_class_order is None:
        raise ValueError("Pass seed= (or fixed_class_order=): without one the class order is random on every run.")
    _check_split(n_classes, n_experiences, first_exp_with_half_classes)
    env_dir = os.environ.get(DATA_ENV)
    if data is None and env_dir and (Path(env_dir) / f"{kind}.npz").is_file():
        data = Path(env_dir) / f"{kind}.npz"
    if data is not None and Path(data).is_dir():
        train, test = _image_folder_datasets(Path(data))
        source = f"imagefolder:{data}"
        if len(train.classes) != n_classes:
            raise ValueError(f"{data} has {len(train.classes)} class folders, {kind} needs {n_classes}.")
    elif data is not None:
        a = load_arrays(data, n_classes)
        if a["x_train"].ndim != 4 or a["x_train"].shape[1:3] != (32, 32):
            raise ValueError(f"{data}: {kind} images must be (N, 32, 32, 3) uint8, got {a['x_train'].shape}.")
        names = a.get("class_names")
        train = ArrayImageDataset(a["x_train"], a["y_train"], None if names is None else names.tolist())
        test = ArrayImageDataset(a["x_test"], a["y_test"])
        source = f"arrays:{data}"
    else:
        from avalanche.benchmarks.datasets.external_datasets.cifar import get_cifar10_dataset, get_cifar100_dataset

        try:
            train, test = (get_cifar10_dataset if kind == "cifar10" else get_cifar100_dataset)(dataset_root)
        except OSError as e:  # no network (URLError), no space, ...
            raise FileNotFoundError(
                f"{kind} is not available offline and the download failed ({type(e).__name__}: {e}). Pass "
                f"--data <{kind}.npz or ImageFolder dir>, set ${DATA_ENV} to a directory holding {kind}.npz, or "
                "point --dataset-root at an existing torchvision copy."
            ) from e
        source = f"torchvision:{dataset_root or 'default location'}"
    train, test = _with_validation(train, test, validation, n_classes, n_experiences, seed or 0)
    train = _subset_dataset(train, _per_class(subset, n_classes, n_experiences), seed or 0)
    test = _subset_dataset(test, _per_class(eval_subset, n_classes, n_experiences), seed or 0)
    default_tr, default_ev = _transforms(normalization or default_norm, image_size, True, 32)
    bm = _build(
        train, test, n_classes=n_classes, n_experiences=n_experiences,
        first_exp_with_half_classes=first_exp_with_half_classes, return_task_id=return_task_id, seed=seed,
        fixed_class_order=fixed_class_order,
        train_transform=train_transform or default_tr, eval_transform=eval_transform or default_ev,
    )
    bm.data_source = source
    bm.normalization = normalization or default_norm
    return bm


def split_cifar10(
    n_experiences: int = 5,
    *,
    seed: int | None = None,
    data: str | os.PathLike | None = None,
    dataset_root: str | os.PathLike | None = None,
    return_task_id: bool = False,
    fixed_class_order: Sequence[int] | None = None,
    first_exp_with_half_classes: bool = False,
    subset: int | None = None,
    eval_subset: int | None = None,
    normalization: tuple | None = None,
    image_size: int | None = None,
    train_transform=None,
    eval_transform=None,
    validation: int | None = None,
):
    """Split CIFAR-10 as Avalanche's ``SplitCIFAR10`` builds it, from any of the sources in the module docstring.

    :param n_experiences: a divisor of 10.
    :param seed: fixes the class order (required unless ``fixed_class_order`` is given).
    :param data: arrays file or ImageFolder directory; default ``$LOWRANK_CL_DATA/cifar10.npz``, then download.
    :param dataset_root: where Avalanche downloads CIFAR-10 when no offline source is found.
    :param return_task_id: task-incremental: task label i for experience i, class ids from 0 in each experience.
    :param subset: keep this many training images per experience (balanced over its classes), for quick runs.
    :param eval_subset: the same for the test images.
    :param validation: hold out this many training images per experience (balanced, disjoint from the training
        images) and use them as the test stream, for choosing hyper-parameters without the test set.
    :param normalization: ``(mean, std)`` instead of Avalanche's CIFAR-10 values (e.g. a pretrained backbone's).
    :param image_size: resize images (e.g. 224 for ImageNet backbones).
    :param train_transform: replaces the default train transform (random crop + flip + normalise).
    :param eval_transform: replaces the default eval transform (normalise).
    :returns: an Avalanche ``NCScenario`` with extra attributes ``data_source``, ``normalization``, ``n_total_classes``.
    """
    return _split_cifar(
        "cifar10", 10, CIFAR10_NORMALIZATION, n_experiences, seed=seed, data=data, dataset_root=dataset_root,
        return_task_id=return_task_id, fixed_class_order=fixed_class_order,
        first_exp_with_half_classes=first_exp_with_half_classes, subset=subset, eval_subset=eval_subset,
        normalization=normalization,
        image_size=image_size, train_transform=train_transform, eval_transform=eval_transform, validation=validation,
    )


def split_cifar100(
    n_experiences: int = 10,
    *,
    seed: int | None = None,
    data: str | os.PathLike | None = None,
    dataset_root: str | os.PathLike | None = None,
    return_task_id: bool = False,
    fixed_class_order: Sequence[int] | None = None,
    first_exp_with_half_classes: bool = False,
    subset: int | None = None,
    eval_subset: int | None = None,
    normalization: tuple | None = None,
    image_size: int | None = None,
    train_transform=None,
    eval_transform=None,
    validation: int | None = None,
):
    """Split CIFAR-100 as Avalanche's ``SplitCIFAR100`` builds it; same parameters as :func:`split_cifar10`
    (``n_experiences`` a divisor of 100; ``$LOWRANK_CL_DATA/cifar100.npz``)."""
    return _split_cifar(
        "cifar100", 100, CIFAR100_NORMALIZATION, n_experiences, seed=seed, data=data, dataset_root=dataset_root,
        return_task_id=return_task_id, fixed_class_order=fixed_class_order,
        first_exp_with_half_classes=first_exp_with_half_classes, subset=subset, eval_subset=eval_subset,
        normalization=normalization,
        image_size=image_size, train_transform=train_transform, eval_transform=eval_transform, validation=validation,
    )


def arrays_benchmark(
    npz: str | os.PathLike,
    n_experiences: int,
    *,
    seed: int | None = None,
    return_task_id: bool = False,
    fixed_class_order: Sequence[int] | None = None,
    subset: int | None = None,
    eval_subset: int | None = None,
    image_size: int | None = None,
    to_rgb: bool = True,
    normalization: tuple | None = None,
    augment: bool = False,
    validation: int | None = None,
):
    """A class-split benchmark from any arrays file (MNIST, users' own data).

    Grey images become 3-channel when ``to_rgb`` (so CIFAR / ImageNet backbones take them); ``image_size`` resizes
    (e.g. 28 → 32). The normalisation defaults to the training set's per-channel mean and std (after ``to_rgb``).

    :param augment: random crop (padding size/8) and horizontal flip while training; off by default since flips
        change digits.
    :param validation: hold out this many training images per experience as the test stream (see
        :func:`split_cifar10`).
    """
    if seed is None and fixed_class_order is None:
        raise ValueError("Pass seed= (or fixed_class_order=): without one the class order is random on every run.")
    a = load_arrays(npz)
    n_classes = int(max(a["y_train"].max(), a["y_test"].max())) + 1
    missing = sorted(set(range(n_classes)) - set(np.unique(a["y_train"]).tolist()))
    if missing:
        raise ValueError(f"{npz}: classes {missing} have no training images; labels must be 0..C-1, all used.")
    _check_split(n_classes, n_experiences, False)
    xtr, ytr, xte, yte = a["x_train"], a["y_train"], a["x_test"], a["y_test"]
    if validation is not None:
        rest, held = _holdout_indices(ytr, _per_class(validation, n_classes, n_experiences), seed or 0)
        xtr, ytr, xte, yte = xtr[rest], ytr[rest], xtr[held], ytr[held]
    xtr, ytr = _subsample(xtr, ytr, _per_class(subset, n_classes, n_experiences), seed or 0)
    xte, yte = _subsample(xte, yte, _per_class(eval_subset, n_classes, n_experiences), seed or 0)
    grey = xtr.ndim == 3
    if normalization is None:
        x = xtr.astype(np.float32) / 255.0
        mean = [float(x.mean())] * 3 if grey else x.reshape(-1, 3).mean(0).tolist()
        std = [float(x.std())] * 3 if grey else x.reshape(-1, 3).std(0).tolist()
        if grey and not to_rgb:
            mean, std = mean[:1], std[:1]
        normalization = (tuple(mean), tuple(std))
    native = xtr.shape[1]
    pre = [transforms.Grayscale(num_output_channels=3)] if (grey and to_rgb) else []
    size = image_size or native
    resize = [transforms.Resize(size)] if size != native else []
    aug = [transforms.RandomCrop(size, padding=max(1, size // 8)), transforms.RandomHorizontalFlip()] if augment else []
    tail = [transforms.ToTensor(), transforms.Normalize(*normalization)]
    names = a.get("class_names")
    bm = _build(
        ArrayImageDataset(xtr, ytr, None if names is None else names.tolist()),
        ArrayImageDataset(xte, yte),
        n_classes=n_classes, n_experiences=n_experiences, first_exp_with_half_classes=False,
        return_task_id=return_task_id, seed=seed, fixed_class_order=fixed_class_order,
        train_transform=transforms.Compose(pre + resize + aug + tail),
        eval_transform=transforms.Compose(pre + resize + tail),
    )
    bm.data_source = f"arrays:{npz}"
    bm.normalization = normalization
    return bm
